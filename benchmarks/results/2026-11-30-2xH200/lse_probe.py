"""Does compiled flex_attention (return_lse) differentiate through the LSE on this torch? And does
an LSE merge of [window keys] and [FAM keys] equal one attention over both (fp32 and bf16)."""
import math, torch
from torch.nn.attention.flex_attention import flex_attention, create_block_mask
torch.manual_seed(0)
print("torch", torch.__version__)
flex = torch.compile(flex_attention, dynamic=False, fullgraph=True)
B, H, S, D = 1, 4, 1024, 128
for dtype in (torch.float32, torch.bfloat16):
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    causal = lambda b, h, qi, ki: ki <= qi
    bm = create_block_mask(causal, None, None, S, S, device="cuda")
    try:
        out, lse = flex(q, k, v, block_mask=bm, return_lse=True)
    except TypeError:
        from torch.nn.attention.flex_attention import AuxRequest
        out, aux = flex(q, k, v, block_mask=bm, return_aux=AuxRequest(lse=True)); lse = aux.lse
    w = torch.randn_like(lse)
    loss = (out.float() * torch.randn_like(out, dtype=torch.float32)).sum() * 0 + (lse * w).sum()
    g = torch.autograd.grad(loss, (q, k))
    qf, kf = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    s = qf @ kf.transpose(-1, -2) / math.sqrt(D)
    s = s.masked_fill(~torch.ones(S, S, dtype=torch.bool, device="cuda").tril(), float("-inf"))
    ref = torch.autograd.grad((torch.logsumexp(s, -1) * w).sum(), (qf, kf))
    for name, a, r in zip("qk", g, ref):
        print(dtype, "lse-grad", name, "max|diff|", (a.float() - r).abs().max().item(), "max|ref|", r.abs().max().item())
