"""Prompt tuning of a small frozen T5 under ZeRO-3 in one process; prints (as JSON) the most
parameter values DeepSpeed held gathered at once in each step, and the backbone's size.

usage: python tests/dist/zero3_gathered.py MAX_LIVE PREFETCH_BUCKET (0 for DeepSpeed's defaults)
"""
from __future__ import annotations

import json
import os
import sys

import deepspeed
import torch
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from transformers import T5Config, T5ForConditionalGeneration



class Prompted(torch.nn.Module):
    def __init__(self, t5):
        super().__init__()
        self.t5 = t5
        self.prompt = torch.nn.Parameter(torch.randn(4, t5.config.d_model) * 0.5)

    def forward(self, ids, labels):
        x = torch.cat([self.prompt.expand(ids.shape[0], -1, -1), self.t5.get_input_embeddings()(ids)], 1)
        return self.t5(inputs_embeds=x, labels=labels).loss


def main() -> None:
    live, bucket = (int(a) for a in sys.argv[1:3])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29803"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed("gloo")
    torch.manual_seed(0)
    config = T5Config(d_model=64, d_ff=160, num_heads=4, d_kv=16, num_layers=3, num_decoder_layers=2,
                      vocab_size=512, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                      feed_forward_proj="gated-gelu", dropout_rate=0.1)
    model = Prompted(T5ForConditionalGeneration(config).requires_grad_(False))
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
    if live:
        zero.update(stage3_max_live_parameters=live, stage3_prefetch_bucket_size=bucket)
    ds, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW([model.prompt], lr=0.1),
                                  config={"train_micro_batch_size_per_gpu": 2, "zero_optimization": zero})
    weights = [p for n, p in ds.module.named_parameters() if n.startswith("t5.")]
    most = [0]

    def probe(*_):
        most[0] = max(most[0], sum(p.ds_numel for p in weights if p.ds_status != ZeroParamStatus.NOT_AVAILABLE))

    for m in ds.module.modules():
        m.register_forward_pre_hook(probe)
        m.register_forward_hook(probe)
    steps = []
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        most[0] = 0
        loss = ds(torch.randint(3, 512, (2, 12), generator=gen), torch.randint(3, 512, (2, 5), generator=gen))
        ds.backward(loss)
        ds.step()
        steps.append(most[0])
    print(json.dumps({"gathered_per_step": steps, "backbone": sum(p.ds_numel for p in weights)}))


if __name__ == "__main__":
    main()
