"""Fine-tuning modes freeze what they should, LoRA/QLoRA merge back exactly, a compressor attaches to a LLaVA
model and trains alone; the shared loop resumes to the same weights, refuses foreign checkpoints, and two
gloo processes reach the weights of one."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgevlm.errors import BackendUnavailableError, CheckpointError, ConfigError, ImageError

pytest.importorskip("accelerate")
pytest.importorskip("peft")
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
torch.set_num_threads(1)


def _tiny(name="edgevlm_scenes_tiny"):
    from edgevlm.modeling.families import load_vlm

    return load_vlm(name, weights="random")


def _numel(module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


@pytest.mark.parametrize("name", ["edgevlm_scenes_tiny", "llava_mini_tiny"])
@pytest.mark.parametrize("mode", ["vision", "decoder", "connector"])
def test_each_mode_trains_exactly_its_parts(name, mode):
    from edgevlm.train.finetune import set_trainable

    vlm = _tiny(name)
    rows = {r["part"]: r for r in set_trainable(vlm, mode)}
    parts = vlm.parts()
    want = {"vision": ["vision"], "decoder": ["language_model"], "connector": ["connector", "fusion"]}[mode]
    for part, m in parts.items():
        expect = _numel(m) if part in want else 0
        assert rows[part]["trainable"] == expect, (part, rows[part])
        assert all(p.requires_grad == (part in want) for p in m.parameters())
    assert rows["total"]["trainable"] == sum(_numel(parts[p]) for p in want if p in parts) > 0


@pytest.mark.parametrize("mode", ["vision", "decoder", "connector", "lora"])
def test_a_finetune_run_changes_only_the_trained_part(mode, tmp_path):
    from edgevlm.modeling.families import load_vlm
    from edgevlm.modeling.scenes_vlm import load
    from edgevlm.train.finetune import FinetuneConfig, finetune
    from edgevlm.train.loop import TrainConfig
    from edgevlm.zoo import get_vlm_recipe

    res = finetune(FinetuneConfig("edgevlm_scenes_tiny", mode, TrainConfig(tmp_path, batch_size=2, max_steps=2, lr=1e-2,
                                                                           quiet=True),
                                  weights="random", limit=4, val_limit=0), log=lambda m: None)
    base = load_vlm("edgevlm_scenes_tiny", weights="random")
    tuned = load(get_vlm_recipe("edgevlm_scenes_tiny"), Path(res["model_weights"]))
    trained = {"vision": "vision", "decoder": "language_model", "connector": "connector", "lora": "language_model"}[mode]
    for part, m in base.parts().items():
        sd, td = m.state_dict(), tuned.parts()[part].state_dict()
        assert set(sd) == set(td)                                   # LoRA merged: the original architecture
        # FP16 storage of the saved model rounds every weight: compare at that precision
        changed = max(float((sd[k].half().float() - td[k]).abs().max()) for k in sd if sd[k].is_floating_point())
        assert (changed > 1e-3) == (part == trained), (part, changed)
    if mode == "lora":
        assert 0 < res["trainable_params"] < res["total_params"] / 4
        assert res["parts"][-1]["trainable"] == res["trainable_params"]


def test_lora_merge_keeps_outputs_and_bad_targets_fail_early():
    from edgevlm.compress.lora import LoraSpec, apply_lora, merge_lora

    vlm = _tiny()
    ids = torch.tensor([[5, 9, 33, 2, 7]])
    with pytest.raises(ConfigError, match="nope do not exist.*q_proj"):
        apply_lora(vlm, LoraSpec(targets=("q_proj", "nope")))
    with pytest.raises(ConfigError, match="rotary_emb \\(not a linear layer\\)"):
        apply_lora(vlm, LoraSpec(targets=("rotary_emb",)))
    assert not hasattr(vlm.language_model, "merge_and_unload")    # nothing was wrapped
    targets = apply_lora(vlm, LoraSpec(r=4, targets=("q_proj", "v_proj")))
    assert targets == ["q_proj", "v_proj"]
    with torch.no_grad():
        for n, p in vlm.language_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)                                     # a trained update, not the zero init
        before = vlm.language_model(input_ids=ids).logits
    base_logits = None
    with torch.no_grad(), vlm.language_model.disable_adapter():
        base_logits = vlm.language_model(input_ids=ids).logits
    assert (before - base_logits).abs().max() > 1e-3                # the update matters
    assert merge_lora(vlm) == 2 * 2                               # 2 layers x 2 targets
    with torch.no_grad():
        after = vlm.language_model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-5)
    assert not any("lora" in k for k in vlm.language_model.state_dict())
    assert type(vlm.language_model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_qlora_without_bitsandbytes_says_what_to_install(monkeypatch):
    from edgevlm.compress.lora import LoraSpec, apply_lora

    vlm = _tiny()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)       # any bitsandbytes import fails, as if missing
    with pytest.raises(BackendUnavailableError, match="bitsandbytes") as info:
        apply_lora(vlm, LoraSpec(quantize="nf4"))
    assert info.value.fix.startswith("pip install 'bitsandbytes")


def test_qlora_trains_on_an_nf4_base_and_merges_to_the_trained_function():
    # No skip: the `test` extra installs bitsandbytes (via `qlora`), so a missing one is a broken test
    # environment and fails here with ImportError. The refusal without it is the test above.
    import bitsandbytes  # noqa: F401

    from edgevlm.compress.lora import LoraSpec, apply_lora, merge_lora

    vlm = _tiny()
    ids = torch.tensor([[5, 9, 33, 2, 7]])
    with torch.no_grad():
        full = vlm.language_model(input_ids=ids).logits
    apply_lora(vlm, LoraSpec(r=4, quantize="nf4"))
    q = vlm.language_model.get_base_model().model.layers[0].self_attn.q_proj.get_base_layer()
    assert type(q).__name__ == "Linear4bit" and q.weight.dtype == torch.uint8
    with torch.no_grad():
        for n, p in vlm.language_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        before = vlm.language_model(input_ids=ids).logits
    assert (before - full).abs().max() > 1e-3
    merge_lora(vlm)
    with torch.no_grad():
        after = vlm.language_model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-4)
    assert all(type(m).__name__ != "Linear4bit" for m in vlm.language_model.modules())


def test_compressor_attached_to_a_llava_checkpoint_trains_alone(tmp_path):
    from vlm_utils import hf_llava_checkpoint

    from edgevlm.modeling.families import load_vlm
    from edgevlm.train.distill import AttachConfig, attach_and_distill, load_attached
    from edgevlm.train.loop import TrainConfig
    from edgevlm.train.vqa import answer_logits, encode_rows

    hf_llava_checkpoint(tmp_path / "llava", sharpen=4.0)
    base = load_vlm("llava_tiny", weights=str(tmp_path / "llava"))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    res = attach_and_distill(AttachConfig("llava_tiny", TrainConfig(tmp_path / "run", batch_size=2, max_steps=2, lr=1e-2,
                                                                    quiet=True),
                                          weights=str(tmp_path / "llava"), n_tokens=1, prefusion_layers=1, limit=2,
                                          val_limit=0), log=lambda m: None, base=base)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())      # the LLaVA model is untouched
    mini = load_attached(base, res["weights"])
    n_new = _numel(mini.fusion) + _numel(mini.connector.compressor) - mini.connector.compressor.pos_embed.numel()
    assert res["trainable_params"] == n_new and res["trained_parts"] == ["connector.compressor", "fusion"]
    assert mini.n_tokens == 1 and mini.compress
    # the compressed path is the one distilled: its answers' logits move towards the uncompressed model's
    from edgevlm.train.data import load_vqa

    data = load_vqa("scenes", "train", 1)
    rows = [(0, q, a) for _, q, a in data.qa[0][:2]]
    with torch.no_grad():
        lt, yt = answer_logits(base, data.pixels(base.image_spec).float(), encode_rows(base, rows))
        ls, ys = answer_logits(mini, data.pixels(mini.image_spec).float(), encode_rows(mini, rows))
    assert ls.shape[1] < lt.shape[1]                               # 1 vision token against the uncompressed grid
    with pytest.raises(ConfigError, match="no pre-fusion layers"):
        from edgevlm.train.distill import attach

        attach(_tiny(), 1, prefusion_layers=2)


def test_resume_after_interruption_reaches_the_uninterrupted_weights(tmp_path):
    import dist_worker

    full, _ = dist_worker.run(tmp_path / "a", steps=5)

    def stop(step, logs):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dist_worker.run(tmp_path / "b", steps=5, callbacks=(stop,))
    from edgevlm.train.loop import list_checkpoints

    assert list_checkpoints(tmp_path / "b")[-1].name == "step_0000003"
    resumed, res = dist_worker.run(tmp_path / "b", steps=5, resume=True)
    assert res.resumed_from == 3 and res.steps == 5
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    # the checkpoint holds no pickle: safetensors and JSON only
    files = {p.suffix for p in list_checkpoints(tmp_path / "b")[-1].iterdir()}
    assert files == {".safetensors", ".json"}


def test_incompatible_checkpoints_are_refused_before_training(tmp_path):
    import dist_worker

    from edgevlm.compress.distill import KDConfig
    from edgevlm.train.distill import ClassifierTask
    from edgevlm.train.loop import TrainConfig, fit

    dist_worker.run(tmp_path, steps=2)
    data = dist_worker.digits16()

    def task(width):
        return ClassifierTask("tiny", dist_worker.tiny_cnn(0, width), data, KDConfig("none"), 0, None,
                              identity={"test": "dist"})

    with pytest.raises(ConfigError, match="already holds checkpoints.*--resume"):
        fit(task(8), TrainConfig(tmp_path, epochs=2, max_steps=2, batch_size=32, quiet=True))
    with pytest.raises(CheckpointError, match="does not fit this run.*schedule differs in lr"):
        fit(task(8), TrainConfig(tmp_path, epochs=2, max_steps=2, batch_size=32, lr=5e-3, quiet=True, resume=True))
    with pytest.raises(CheckpointError, match="trainable tensors differ"):
        fit(task(4), TrainConfig(tmp_path, epochs=2, max_steps=4, batch_size=32, lr=1e-2, quiet=True, resume=True))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_reach_the_weights_of_one(tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo), global batch 32 = 2 x 16, against one process and against
    one process with 2 accumulation steps."""
    import dist_worker
    from safetensors.torch import load_file

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(HERE / "dist_worker.py"), str(tmp_path / "two")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "two" / "final.safetensors"), "pt") as f:
        assert f.metadata()["processes"] == "2"
    two = load_file(str(tmp_path / "two" / "final.safetensors"))
    one, _ = dist_worker.run(tmp_path / "one")
    accum, _ = dist_worker.run(tmp_path / "acc", grad_accum=2)
    init = dist_worker.tiny_cnn(0).state_dict()
    for k, v in one.state_dict().items():
        assert (v - init[k]).abs().max() > 1e-3                    # training moved the weights
        assert torch.allclose(two[k], v, atol=1e-6), (k, float((two[k] - v).abs().max()))
        assert torch.allclose(accum.state_dict()[k], v, atol=1e-6)


def test_cli_finetune_smoke_and_bad_lora_target(tmp_path, capsys):
    def edgevlm(*args):
        return subprocess.run([sys.executable, "-m", "edgevlm", *map(str, args)], capture_output=True, text=True)

    r = edgevlm("finetune", "--model", "edgevlm_scenes_tiny", "--weights", "random", "--mode", "lora", "--steps", "1",
                "--batch-size", "2", "--limit", "2", "--val-limit", "0", "--out", tmp_path / "o", "--threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert 0 < res["trainable_params"] < res["total_params"] and "trainable parameters" in r.stdout
    assert (tmp_path / "o" / "model.safetensors").is_file()
    from edgevlm.cli import main

    code = main(["finetune", "--model", "edgevlm_scenes_tiny", "--weights", "random", "--mode", "lora",
                 "--lora-targets", "q_proj", "wq", "--out", str(tmp_path / "p"), "--limit", "2", "--val-limit", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "wq do not exist" in err and err.startswith("edgevlm: error:")
    assert not (tmp_path / "p" / "checkpoints").exists()


def test_vqa_folder_with_an_unreadable_image_fails_before_any_step(tmp_path):
    from PIL import Image

    from edgevlm.train.finetune import FinetuneConfig, finetune
    from edgevlm.train.loop import TrainConfig

    d = tmp_path / "vqa"
    d.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(d / "red.png")
    (d / "blue.png").write_bytes(b"\x89PNG truncated")
    (d / "qa.jsonl").write_text(json.dumps({"image": "red.png", "question": "what colour?", "answer": "red"}) + "\n"
                                + json.dumps({"image": "blue.png", "question": "what colour?", "answer": "blue"}) + "\n")
    cfg = FinetuneConfig("edgevlm_scenes_tiny", "connector", TrainConfig(tmp_path / "o", max_steps=1), weights="random",
                         data=str(d))
    with pytest.raises(ImageError, match="1 images named in .*qa.jsonl cannot be used: blue.png"):
        finetune(cfg, log=lambda m: None)
    assert not (tmp_path / "o").exists()
    (d / "qa.jsonl").write_text('{"image": "red.png", "question": "q"}\n')
    with pytest.raises(ConfigError, match="line 1 is not a qa record"):
        finetune(cfg, log=lambda m: None)
