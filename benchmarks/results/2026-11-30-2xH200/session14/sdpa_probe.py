"""Probe: the raw flash / mem-efficient SDPA ops, forward + backward, inside torch.compile(fullgraph)
and a CUDA graph, against the matmul attention; times per call at the scan's shapes."""
import torch, time
torch.manual_seed(0)
print("torch", torch.__version__, torch.cuda.get_device_name())
dev = "cuda"
def matmul_fb(q, k, v, bias, do, scale):
    s = torch.bmm(q.flatten(0,1), k.flatten(0,1).transpose(1,2), out_dtype=torch.float32).view(*q.shape[:2], q.shape[2], k.shape[2]) * scale
    if bias is not None: s = s + bias
    p = torch.softmax(s, -1)
    o = (p.to(v.dtype) @ v)
    dp = (do @ v.transpose(-1,-2)).float()
    ds = (p * (dp - (dp*p).sum(-1, keepdim=True)) * scale).to(q.dtype)
    return o, ds @ k, ds.transpose(-1,-2) @ q, p.to(v.dtype).transpose(-1,-2) @ do
def eff_fb(q, k, v, bias, do, scale):
    b = bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], -1)
    o, lse, seed, off = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, b, True, 0.0, False, scale=scale)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(do, q, k, v, b, o, lse, seed, off, 0.0, [True, True, True, False], False, scale=scale)
    return o, dq, dk, dv
def eff_split(q, k, v, bias, do, scale):
    b = bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], -1)
    o, lse, seed, off = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, b, True, 0.0, False, scale=scale)
    z = torch.zeros((), dtype=torch.long, device=q.device)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(do, q, k, v, b, o, lse, z, z, 0.0, [True, True, True, False], False, scale=scale)
    return o, dq, dk, dv
def flash_fb(q, k, v, bias, do, scale):
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    o, lse = out[0], out[1]
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(do, q, k, v, o, lse, out[2], out[3], out[4], out[5], 0.0, False, out[6], out[7], scale=scale)
    return o, dq, dk, dv
for b in (1, 4):
    G, F, L, D = 12, 64, 1088, 128
    S = torch.randn(L, b, G, D, device=dev, dtype=torch.bfloat16)
    k = S.permute(1, 2, 0, 3); v = torch.randn_like(S).permute(1, 2, 0, 3)
    q = torch.randn(b, G, F, D, device=dev, dtype=torch.bfloat16); do = torch.randn_like(q)
    bias = torch.zeros(L, device=dev); bias[1000:] = float("-inf")
    zero = torch.zeros(L, device=dev)
    ref = matmul_fb(q.float(), k.float(), v.float(), bias, do.float(), D**-0.5)
    for name, fn, bb in (("matmul", matmul_fb, bias), ("efficient", eff_fb, bias), ("efficient_z", eff_split, bias), ("flash(nobias)", flash_fb, None)):
        try:
            c = torch.compile(fn, fullgraph=True, dynamic=False)
            r = c(q, k, v, bb, do, D**-0.5)
            rr = ref if bb is not None else matmul_fb(q.float(), k.float(), v.float(), None, do.float(), D**-0.5)
            err = [((x.float() - y).abs().max() / y.abs().max()).item() for x, y in zip(r, rr)]
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3): c(q, k, v, bb, do, D**-0.5)
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                for _ in range(100): c(q, k, v, bb, do, D**-0.5)
            g.replay(); torch.cuda.synchronize()
            t = time.perf_counter(); g.replay(); g.replay(); torch.cuda.synchronize()
            print(f"b={b} {name:14s} rel err {['%.1e' % e for e in err]}  {(time.perf_counter()-t)/200*1e6:.1f} us fwd+bwd")
        except Exception as e:
            print(f"b={b} {name} FAILED {type(e).__name__}: {str(e)[:300]}")
