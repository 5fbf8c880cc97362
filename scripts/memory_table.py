#!/usr/bin/env python
"""Per-GPU memory of training the paper's 12B DALL-E under FSDP2 as dalle_fast shards it (fully_shard per
residual branch, sharded fp32 parameters, fp32 gradients, AdamW moments, 16-bit all-gathered branch
matrices), computed from the config (parameters counted on the meta device), not typed in.

    .venv/bin/python scripts/memory_table.py                    # 8, 64, 1024 GPUs, micro-batch 1 per GPU
    .venv/bin/python scripts/memory_table.py --gpus 8 512 --micro-batch 2 --markdown

Model of the memory (GiB = 2^30 bytes), per GPU of N:
  parameters   4 P / N            fp32 shards (the optimizer's copy; FSDP2 keeps no other full copy)
  gradients    4 P / N            fp32 (reduce_dtype) shards
  Adam         8 P / N            exp_avg and exp_avg_sq, fp32 shards
  gathered     2 x 2 B            two residual branches' matrices unsharded in 16-bit (the current one and the
                                  prefetched next), B the largest branch's parameter count
  activations  checkpointing every branch: the fp32 residual stream at each of the 2 x depth branch
               boundaries (m x seq x d x 4 bytes each), plus the working set of recomputing one branch
               (its 16-bit intermediates: m x seq x (3d + d + 4d + 4d) x 2 bytes for the largest, and the
               attention scores of one branch, m x heads x seq x seq x 2 bytes, an upper bound: the sparse
               kernels keep less), plus the fp32 logits of the micro-batch (m x seq x vocab x 4 x 2 for the
               softmax's output and gradient).
Not counted: the CUDA context, allocator fragmentation, communication buffers, the frozen dVAE (not needed
when tokens are cached).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GIB = 2 ** 30


def counts(cfg):
    from dalle_fast.models.dalle import DALLE
    with torch.device("meta"):
        model = DALLE(cfg)
    total = sum(p.numel() for p in model.parameters())
    branch = max(sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                     for m in b.modules() if isinstance(m, torch.nn.Linear)) for b in model.resblocks())
    return total, branch


def rows(cfg, gpus, micro_batch):
    total, branch = counts(cfg)
    d, seq, heads = cfg.dim, cfg.seq_len, cfg.heads
    vocab = cfg.num_text_tokens + cfg.text_len + cfg.num_image_tokens
    act = (2 * cfg.depth * micro_batch * seq * d * 4
           + micro_batch * seq * (3 * d + d + 4 * d + 4 * d) * 2
           + micro_batch * heads * seq * seq * 2
           + micro_batch * seq * vocab * 4 * 2)
    out = []
    for n in gpus:
        r = {"gpus": n, "params": 4 * total / n, "grads": 4 * total / n, "adam": 8 * total / n,
             "gathered": 2 * 2 * branch, "activations": act}
        r["total"] = sum(v for k, v in r.items() if k != "gpus")
        out.append(r)
    return total, branch, out


def main():
    from dalle_fast.models.dalle import DALLEConfig
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 1024])
    ap.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per forward (gradient accumulation)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    cfg = DALLEConfig.paper()
    total, branch, table = rows(cfg, args.gpus, args.micro_batch)
    print(f"12B config: {total / 1e9:.3f} B parameters, largest residual branch {branch / 1e6:.1f} M, "
          f"d_model {cfg.dim}, depth {cfg.depth}, sequence {cfg.seq_len}, micro-batch {args.micro_batch} per GPU")
    cols = ["gpus", "params", "grads", "adam", "gathered", "activations", "total"]
    if args.markdown:
        print("| GPUs | parameters (fp32 shard) | gradients (fp32 shard) | Adam moments | gathered 16-bit branches "
              "| activations (checkpointed) | total GiB |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for r in table:
            print("| " + " | ".join([str(r["gpus"])] + [f"{r[c] / GIB:.2f}" for c in cols[1:]]) + " |")
    else:
        print("  ".join(c.rjust(11) for c in cols))
        for r in table:
            print("  ".join([str(r["gpus"]).rjust(11)] + [f"{r[c] / GIB:11.2f}" for c in cols[1:]]))


if __name__ == "__main__":
    main()
