"""Expert-parallel training of the ViT on gloo equals the single-process run, for expert choice and Soft MoE.

10 steps at expert_parallel = 2, with the non-expert weights FSDP2-sharded over the two ranks, give the same per-step
losses, routing metrics, evaluation (loss and accuracy over the whole evaluation set) and final weights as one process
on the same global batches: each rank trains on its contiguous share of every batch of images, as the language
model does with its token windows. The same runs at degree 4, non-expert weights replicated, are checked for
losses, loads and final weights.

Routing per image makes the runs comparable exactly: Soft MoE always mixes one image's tokens (each image is its
own group), and expert choice routes groups of ``moe.group_size`` tokens, set here to the 16 tokens of one image
(routing the whole batch as one group would make a token's expert depend on which images share its rank). No
random draw happens after initialisation (no dropout, no jitter).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

from moekit.lab.training.run import train_run  # noqa: E402
from moekit.lab.training.run_config import load_run_config  # noqa: E402
from moekit.training.metrics import read_metrics  # noqa: E402
from tests.distributed._checkpoints import checkpoint_weights  # noqa: E402
from tests.distributed._launch import spawn  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STEPS = 10
WORLD = 2
# Digits are 8x8: 2x2 patches give 16 tokens per image. A tiny model, one MoE block of 4 experts.
TINY = [
    "data.dataset=digits",
    "data.train_examples=400",
    "model.patch_size=2",
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.d_ff=64",
    "model.moe_blocks=[1]",
    "moe.num_experts=4",
    "moe.d_ff=64",
    f"train.max_steps={STEPS}",
    "train.batch_size=16",
    "train.warmup_steps=2",
    "train.eval_every=5",
    "train.eval_batches=3",  # 48 test images in batches of 16
    f"train.checkpoint_every={STEPS}",
    "train.log_every=1",
    "train.progress=off",
    "train.threads=1",
]
ROUTERS = {
    "expert_choice": ("vit-ec", ["moe.group_size=16"]),  # one image's tokens per routing group
    "soft": ("vit-softmoe", ["moe.slots_per_expert=4"]),  # 4 experts x 4 slots = the 16 tokens
}


def _config(router: str, world: int, fsdp: bool = False):
    name, extra = ROUTERS[router]
    return load_run_config(CONFIGS / f"{name}.toml", [*TINY, *extra, f"parallel.expert_parallel={world}",
                                                      f"parallel.fsdp={str(fsdp).lower()}"])


def _train_all(rank: int, world: int, out: str, fsdp: bool) -> None:
    # Both routers in one launch: starting the processes costs more than their 10 steps.
    for router in ROUTERS:
        train_run(_config(router, world, fsdp), Path(out) / router, log=lambda m: None)


def _records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint_weights(run_dir / "checkpoints" / f"step_{STEPS:08d}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ep_vit")
    torch.set_num_threads(1)
    for router in ROUTERS:
        train_run(_config(router, 1), tmp / "ref" / router, log=lambda m: None)
    spawn(_train_all, WORLD, str(tmp / "ep"), True)
    return tmp


@pytest.mark.parametrize("router", list(ROUTERS))
def test_vit_under_expert_parallelism_and_fsdp_matches_one_process(runs, router):
    ref_dir, run_dir = runs / "ref" / router, runs / "ep" / router
    ref, got = _records(ref_dir), _records(run_dir)
    assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1))
    assert [s for s in ref if "val_loss" in ref[s]] == [5, 10]
    for step, r in ref.items():
        g = got[step]
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-5, abs=1e-6), step
        # The routing metrics are the whole batch's, summed or averaged over the ranks.
        assert g["tokens_per_expert"] == r["tokens_per_expert"], step
        for key in ("drop_fraction", "router_entropy", "max_router_logit"):
            assert g[key] == pytest.approx(r[key], rel=1e-4, abs=1e-6), (step, key)
        if "val_loss" in r:  # steps 5 and 10: loss and accuracy over all 48 evaluation images
            assert g["val_loss"] == pytest.approx(r["val_loss"], rel=1e-5, abs=1e-6), step
            assert g["val_accuracy"] == r["val_accuracy"], step
    w_ref, w = _weights(ref_dir), _weights(run_dir)
    assert w.keys() == w_ref.keys()
    for name in w_ref:
        assert w[name].shape == w_ref[name].shape, name
        torch.testing.assert_close(w[name], w_ref[name], rtol=1e-4, atol=1e-5)
    # Only rank 0 wrote files: the same layout as the single-process run.
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(p.name for p in ref_dir.iterdir())


def test_vit_under_four_expert_parallel_ranks_matches_one_process(runs, tmp_path):
    # Degree 4 of the same training runs: one expert per rank, 4 images per rank per step.
    spawn(_train_all, 4, str(tmp_path), False)
    for router in ROUTERS:
        ref, got = _records(runs / "ref" / router), _records(tmp_path / router)
        assert sorted(got) == list(range(1, STEPS + 1))
        for step, r in ref.items():
            assert got[step]["loss"] == pytest.approx(r["loss"], rel=1e-5, abs=1e-6), (router, step)
            assert got[step]["tokens_per_expert"] == r["tokens_per_expert"], (router, step)
        w_ref, w = _weights(runs / "ref" / router), _weights(tmp_path / router)
        for name in w_ref:
            torch.testing.assert_close(w[name], w_ref[name], rtol=1e-4, atol=1e-5)
