"""Checkpoints read as something other than a training resume: `whole_model.load_whole_model` gives
any training layout's checkpoint (TP shards, PP stage files, ZeRO-1/2/3) as one whole TP=1 model in
one process, for generation, evaluation and Hugging Face export."""
