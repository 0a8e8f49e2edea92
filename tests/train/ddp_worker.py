"""Run under torchrun by test_ddp.py: train a tiny MoELM with DDP and save this rank's weights.

Usage: torchrun --nproc_per_node 2 ddp_worker.py OUT DATA_DIR BATCH_SIZE [EP]

With EP > 1 the experts are sharded over the ranks (``TrainConfig.ep``); the final model is then
saved gathered by rank 0 (``OUT/final``), and no per-rank file is written. A second trainer then
resumes from the step-3 checkpoint (gathered model, one optimizer shard per rank) into
``OUT/resumed`` and trains to the end.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from moelab.models import MoELMConfig
from moelab.train.trainer import TrainConfig, Trainer


def configs(data_dir: str, batch_size: int, ep: int = 1) -> tuple[MoELMConfig, TrainConfig]:
    # No auxiliary losses and dropless routing: the mean CE over the global batch is then exactly
    # the mean of the ranks' losses, so DDP must match one process on the concatenated batch.
    # sigmoid_topk's bias update all-reduces the load, so it must match too.
    model = MoELMConfig(
        d_model=32,
        n_layers=2,
        n_heads=2,
        max_seq_len=32,
        num_experts=4,
        top_k=2,
        router="sigmoid_topk",
        aux_losses={},
    )
    train = TrainConfig(
        steps=6,
        batch_size=batch_size,
        seq_len=32,
        lr=1e-3,
        warmup_steps=2,
        eval_every=3,
        eval_batches=4,
        ckpt_every=3,
        data=data_dir,
        ep=ep,
    )
    return model, train


def main() -> None:
    out, data_dir, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ep = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    torch.set_num_threads(1)
    mcfg, tcfg = configs(data_dir, batch_size, ep)
    trainer = Trainer(mcfg, tcfg, out, progress=False)
    res = trainer.train()  # raises if the replicas diverge
    if ep > 1:
        trainer.close()
        again = Trainer(mcfg, tcfg, f"{out}/resumed", progress=False)
        again.train(resume=f"{out}/checkpoints/step_0000003")
        again.close()
        dist.destroy_process_group()
        return
    state = {k: v.detach().contiguous() for k, v in trainer.model.state_dict().items()}
    meta = {
        "val_loss": repr(res.val_loss),
        "val_loss_se": repr(res.val_loss_se),
        "windows": repr(sorted(res.val_window_losses)),  # every rank's windows, gathered
    }
    save_file(state, f"{out}/rank{trainer.rank}.safetensors", metadata=meta)
    trainer.close()  # before destroying the group: see Trainer.close
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
