"""``moekit import-hf`` / ``export-hf`` end to end on a tiny random Qwen3-MoE (nothing downloads): the imported run
evaluates, generates the tokens transformers generates, trains on, and exports to a directory transformers loads
with equal logits; bad input is refused in one line and leaves nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from moekit.lab.cli import main

transformers = pytest.importorskip("transformers")
from tests.hf._tiny import tiny_hf_model  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    from moekit.lab.data.corpus import load_corpus
    from moekit.lab.data.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("qwen3moe")
    model = tiny_hf_model("qwen3_moe", vocab_size=512)
    model.save_pretrained(path)
    docs = load_corpus("builtin")
    tok = train_tokenizer([d[:2000] for d in docs[:300]], 400)
    tok.save(str(path / "tokenizer.json"))
    return path


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_import_eval_generate_train_export(hf_dir, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = _run(["import-hf", str(hf_dir), "--out", str(run), "--set", "data.max_chars=60000",
                           "--set", "data.seq_len=32", "--set", "train.batch_size=4"], capsys)
    assert code == 0, err
    assert "8 experts, top-2, MoE blocks [1, 3]" in out
    cfg = (run / "config.toml").read_text()
    assert 'tokenizer = "imported"' in cfg and 'init_from = "init/model.safetensors"' in cfg
    assert (run / "hf" / "config.json").is_file()
    manifest = json.loads((run / "run_manifest.json").read_text())  # verified from the start, like a trained run
    assert "config.toml" in json.dumps(manifest) and "data/tokens.safetensors" in json.dumps(manifest)

    code, out, err = _run(["eval", str(run), "--batches", "2"], capsys)
    assert code == 0, err
    loss0 = float(out.split("validation loss ")[1].split()[0])
    assert 0 < loss0 < 30

    # greedy generation equals transformers' on the same prompt ids
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(run / "tokenizer.json"))
    prompt = "def read(path):"
    code, out, err = _run(["generate", str(run), "--prompt", prompt, "--temperature", "0",
                           "--max-new-tokens", "8"], capsys)
    assert code == 0, err
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).float().eval()
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids])
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    assert out.rstrip("\n") == tok.decode(ref[0].tolist())

    code, out, err = _run(["train", "--resume", str(run), "--set", "train.max_steps=3",
                           "--set", "train.eval_every=3", "--set", "train.checkpoint_every=3"], capsys)
    assert code == 0, err
    assert (run / "checkpoints" / "step_00000003").is_dir()

    exported = tmp_path / "exported"
    code, out, err = _run(["export-hf", str(run), "--out", str(exported)], capsys)
    assert code == 0, err
    assert "qwen3_moe" in out
    assert json.loads((exported / "config.json").read_text())["eos_token_id"] == 2
    assert (exported / "tokenizer.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(exported).float().eval()
    from moekit.lab.training.run import load_trained_run

    trained = load_trained_run(run).model
    tokens = torch.randint(3, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = back(tokens).logits, trained(tokens).logits_BTV
    assert (a - b).abs().max() / b.abs().max() < 1e-4
    with torch.no_grad():  # training moved the weights: the export is the trained model, not the import
        assert (hf(tokens).logits - b).abs().max() > 1e-3


def test_export_of_a_moekit_trained_dense_swiglu_run_loads_in_transformers(tmp_path, capsys, tiny_corpus):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[model]\nd_model = 32\nn_layers = 2\nn_heads = 4\nd_ff = 64\nactivation = "swiglu"\n'
        f'[data]\ncorpus = "{tiny_corpus}"\nvocab_size = 300\nseq_len = 32\n'
        "[train]\nmax_steps = 2\nbatch_size = 4\neval_every = 2\ncheckpoint_every = 2\nlog_every = 1\n"
    )
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--run-dir", str(run)]) == 0
    capsys.readouterr()
    code, out, err = _run(["export-hf", str(run), "--out", str(tmp_path / "hf")], capsys)
    assert code == 0, err
    assert "llama" in out
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    from moekit.lab.training.run import load_trained_run

    mk = load_trained_run(run).model
    tokens = torch.randint(0, 250, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = back(tokens).logits, mk(tokens).logits_BTV
    assert (a - b).abs().max() / b.abs().max() < 1e-4


def test_export_refuses_a_model_no_family_represents(tmp_path, capsys, tiny_corpus):
    cfg = tmp_path / "c.toml"
    cfg.write_text(  # gelu (not gated) experts: no Hugging Face MoE family computes them
        '[model]\nd_model = 32\nn_layers = 2\nn_heads = 4\nd_ff = 64\n[moe]\nnum_experts = 2\n'
        f'[data]\ncorpus = "{tiny_corpus}"\nvocab_size = 300\nseq_len = 32\n'
        "[train]\nmax_steps = 1\nbatch_size = 2\neval_every = 1\ncheckpoint_every = 1\n"
    )
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--run-dir", str(run)]) == 0
    capsys.readouterr()
    code, _, err = _run(["export-hf", str(run), "--out", str(tmp_path / "hf")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no Hugging Face family represents this model exactly" in err and "not SwiGLU" in err
    assert not (tmp_path / "hf").exists()


def _broken_copy(hf_dir: Path, tmp_path: Path, edit) -> Path:
    d = tmp_path / "broken"
    shutil.copytree(hf_dir, d)
    edit(d)
    return d


def _edit_config(**changes):
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def _drop_tensor(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(d / "model.safetensors")
    del sd["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(sd, d / "model.safetensors")


def _pickle_only(d: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not opened")


@pytest.mark.parametrize("edit, message", [
    (_edit_config(model_type="gpt_neox"), "model_type 'gpt_neox' is not supported"),
    (_edit_config(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "rotary scaling 'yarn'"),
    (_edit_config(moe_intermediate_size=20), "has shape [16, 32], the config implies [20, 32]"),
    (_drop_tensor, "no tensor 'model.layers.1.mlp.experts.3.up_proj.weight'"),
    (_pickle_only, "pytorch_model.bin, a pickle checkpoint: moekit never unpickles"),
    (lambda d: (d / "tokenizer.json").unlink(), "has no tokenizer.json"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 4), "not a safetensors file"),
])
def test_import_refusals_are_one_line_and_leave_nothing(hf_dir, tmp_path, capsys, edit, message):
    bad = _broken_copy(hf_dir, tmp_path, edit)
    out = tmp_path / "run"
    code, _, err = _run(["import-hf", str(bad), "--out", str(out), "--set", "data.max_chars=20000"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists() and not list(tmp_path.glob(".run*"))


def _loss(out: str) -> float:
    return float(out.split("validation loss ")[1].split()[0])


def test_imported_runs_feed_analyze_distill_and_upcycle(hf_dir, tmp_path, capsys):
    """An imported MoE run is analysed and distilled like a trained one; an imported dense Llama upcycles to an MoE
    whose validation loss at initialisation equals the dense model's (the experts are copies, the gates
    renormalised)."""
    run = tmp_path / "moe"
    sets = ["--set", "data.max_chars=30000", "--set", "data.seq_len=32", "--set", "train.batch_size=4"]
    assert _run(["import-hf", str(hf_dir), "--out", str(run), *sets], capsys)[0] == 0
    code, out, err = _run(["analyze", str(run), "--max-tokens", "256", "--permutations", "2"], capsys)
    assert code == 0, err
    assert (run / "analysis" / "report.html").is_file() and (run / "analysis" / "analysis.json").is_file()
    student = tmp_path / "student"  # distillation into a dense student starts from the student's own weights
    code, out, err = _run(["distill", str(run), "--run-dir", str(student), "--set", "train.max_steps=2",
                           "--set", "train.eval_every=2", "--set", "train.checkpoint_every=2"], capsys)
    assert code == 0, err
    assert (student / "checkpoints" / "step_00000002").is_dir() and 'init_from = "none"' in (
        student / "config.toml").read_text()

    llama_dir = tmp_path / "llama"
    tiny_hf_model("llama", vocab_size=512).save_pretrained(llama_dir)
    shutil.copyfile(hf_dir / "tokenizer.json", llama_dir / "tokenizer.json")
    dense = tmp_path / "dense"
    assert _run(["import-hf", str(llama_dir), "--out", str(dense), *sets], capsys)[0] == 0
    code, out, err = _run(["eval", str(dense), "--batches", "3"], capsys)
    assert code == 0, err
    dense_loss = _loss(out)
    up = tmp_path / "up"
    code, out, err = _run(["upcycle", str(dense), "--experts", "4", "--top-k", "2", "--out", str(up)], capsys)
    assert code == 0, err
    code, out, err = _run(["eval", str(up), "--batches", "3"], capsys)
    assert code == 0, err
    assert abs(_loss(out) - dense_loss) < 1e-4
    # The upcycled model keeps Llama's attention, with biases on q, k, v and o: no MoE family has those, and
    # export says so rather than writing a model that computes something else.
    code, _, err = _run(["export-hf", str(up), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "no Hugging Face family represents this model exactly" in err


def test_sharded_checkpoints_read_and_write(tmp_path):
    from moekit.hf import from_pretrained, save_pretrained

    hf = tiny_hf_model("mixtral")
    hf.save_pretrained(tmp_path / "a", max_shard_size="40KB")  # transformers' own sharding
    assert (tmp_path / "a" / "model.safetensors.index.json").is_file()
    mk = from_pretrained(tmp_path / "a")
    save_pretrained(mk, tmp_path / "b", max_shard_bytes=40_000)  # moekit's
    shards = sorted(p.name for p in (tmp_path / "b").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "b" / "model.safetensors.index.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b").float().eval()
    tokens = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, got, again = hf(tokens).logits, mk(tokens).logits_BTV, back(tokens).logits
    assert (got - ref).abs().max() / ref.abs().max() < 1e-4
    assert torch.equal(again, ref) or (again - ref).abs().max() / ref.abs().max() < 1e-6


def test_import_and_export_a_switch_transformers_encoder_decoder(tmp_path, capsys):
    """A tiny random Switch Transformers directory (with a BPE tokenizer holding T5-style sentinels) becomes a
    seq2seq run: span-corruption eval, generation, continued training, and an export transformers loads."""
    from moekit.lab.data.corpus import load_corpus
    from moekit.lab.data.tokenizer import train_tokenizer

    config = transformers.AutoConfig.for_model(
        "switch_transformers", vocab_size=512, d_model=32, d_kv=8, d_ff=40, num_heads=4, num_layers=2,
        num_decoder_layers=2, num_experts=4, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
        expert_capacity=10_000, relative_attention_num_buckets=8, relative_attention_max_distance=20,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=0)  # id 0: the tokenizer's end-of-text
    torch.manual_seed(0)
    hf = transformers.AutoModelForSeq2SeqLM.from_config(config).float().eval()
    hf_dir = tmp_path / "switch"
    hf.save_pretrained(hf_dir)
    tok = train_tokenizer([d[:2000] for d in load_corpus("builtin")[:300]], 400, sentinels=20)
    tok.save(str(hf_dir / "tokenizer.json"))

    run = tmp_path / "run"
    code, out, err = _run(["import-hf", str(hf_dir), "--out", str(run), "--set", "data.max_chars=60000",
                           "--set", "data.seq_len=32", "--set", "train.batch_size=4"], capsys)
    assert code == 0, err
    cfg = (run / "config.toml").read_text()
    assert 'arch = "seq2seq"' in cfg and "sentinels = 20" in cfg and 'tokenizer = "imported"' in cfg
    code, out, err = _run(["eval", str(run), "--batches", "2"], capsys)
    assert code == 0 and "span-corruption validation loss" in out, err
    code, out, err = _run(["generate", str(run), "--prompt", "the <extra_id_0> of", "--temperature", "0",
                           "--max-new-tokens", "4"], capsys)
    assert code == 0, err
    code, out, err = _run(["train", "--resume", str(run), "--set", "train.max_steps=2", "--set", "train.eval_every=2",
                           "--set", "train.checkpoint_every=2"], capsys)
    assert code == 0, err
    exported = tmp_path / "exported"
    code, out, err = _run(["export-hf", str(run), "--out", str(exported)], capsys)
    assert code == 0 and "switch_transformers" in out, err
    back = transformers.AutoModelForSeq2SeqLM.from_pretrained(exported).float().eval()
    from moekit.lab.training.run import load_trained_run

    trained = load_trained_run(run).model
    x = torch.randint(21, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    y = torch.randint(21, 400, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = back(input_ids=x, labels=y).logits
        b = trained(x, y).logits_BTV
    assert (a - b).abs().max() / b.abs().max() < 1e-4
