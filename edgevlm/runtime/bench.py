"""`edgevlm bench`: latency percentiles, throughput and peak memory of a bundle (no torch)."""
from __future__ import annotations

import resource
import time
from pathlib import Path

import numpy as np

from ..report import table, write_json


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mib() -> float:
    """VmHWM of /proc/self/status: this address space's peak. ``ru_maxrss`` is not used where /proc exists: Linux
    carries it across fork and exec, so a bench started from a large process (a test runner) reported that
    process's peak (1141 MiB for a 100 MiB bundle)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024               # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB (macOS: bytes)


def rss_mib() -> float:
    """Resident memory of this process now, in MiB (Linux)."""
    return _rss_mib()


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB: the figure `edgevlm bench` reports."""
    return _peak_mib()


def time_calls(fn, runs: int, warmup: int) -> np.ndarray:
    """Seconds per call over ``runs`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = np.empty(runs)
    for i in range(runs):
        t = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t
    return out


def _timed_load(bundle, **kw):
    """(loaded bundle, load seconds, RSS before loading): onnxruntime is imported before the baseline so its
    own memory is not counted as the model's."""
    from . import load

    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        pass
    base_rss = _rss_mib()
    t = time.perf_counter()
    obj = load(bundle, **kw)
    return obj, time.perf_counter() - t, base_rss


def bench_bundle(bundle, runs: int = 50, warmup: int = 5, batch: int = 8, json_out=None, backend=None,
                 threads=None, quiet: bool = False) -> dict:
    clf, load_s, base_rss = _timed_load(bundle, backend=backend, threads=threads)
    size = clf.manifest["model"]["input_size"]
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((1, 3, size, size), dtype=np.float32)
    xb = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
    lat = time_calls(lambda: clf.logits(x1), runs, warmup) * 1000
    thr_runs = max(3, runs // 5)
    tb = time_calls(lambda: clf.logits(xb, batch_size=batch), thr_runs, 1)
    art = clf.manifest["artifacts"][0]
    res = {
        "bundle": str(bundle), "model": clf.manifest["model"]["name"], "target": clf.manifest["target"]["name"],
        "precision": clf.manifest["precision"], "backend": clf.backend, "input_size": size,
        "load_s": round(load_s, 3), "runs": runs, "latency_ms_p50": float(np.percentile(lat, 50)),
        "latency_ms_p90": float(np.percentile(lat, 90)), "latency_ms_mean": float(lat.mean()),
        "batch": batch, "throughput_img_s": float(batch / np.median(tb)),
        "peak_rss_mib": round(_peak_mib(), 1), "rss_added_mib": round(max(0.0, _rss_mib() - base_rss), 1),
        "artifact_mb": round(sum(f["size"] for f in clf.manifest["files"].values()) / 1e6, 2),
        "artifact": art["path"],
    }
    if not quiet:
        cols = ["model", "precision", "backend", "latency_ms_p50", "latency_ms_p90", "throughput_img_s",
                "peak_rss_mib", "rss_added_mib", "artifact_mb"]
        print(table([res], cols, title=f"edgevlm bench {bundle} (batch 1 latency over {runs} runs, "
                                       f"throughput at batch {batch})"))
    out = Path(json_out) if json_out else Path("benchmarks/results") / f"bench-{Path(bundle).name}.json"
    write_json(out, res)
    if not quiet:
        print(f"wrote {out}")
    return res


def bench_vlm_bundle(bundle, runs: int = 5, new_tokens: int = 64, json_out=None, decoder=None, threads=None,
                     image=None, prompt: str | None = None, quiet: bool = False, gpu_layers: int | None = None) -> dict:
    """Time to first token (image encoding + prefill), decode tokens/s and peak memory of a VLM bundle.

    Every run decodes exactly ``new_tokens`` tokens (stop tokens ignored) so runs are comparable.
    """
    from ..generation import GenerationConfig

    vlm, load_s, base_rss = _timed_load(bundle, decoder=decoder, threads=threads, gpu_layers=gpu_layers)
    if image is None:
        from ..data import scenes

        image = scenes.render(scenes.make_scene("val", 1))
    prompt = prompt or ("describe the image." if vlm.spec.get("family") == "edgevlm" else "What is in this image?")
    ttft, encode, tps = [], [], []
    budget = max(2, min(new_tokens, vlm.context_length - 1))
    for i in range(runs + 1):                      # the first run warms up and is not counted
        embeds, _, stats, prefix = vlm.start(image, prompt, max_new_tokens=budget)
        cfg = GenerationConfig(max_new_tokens=min(budget, vlm.context_length - int(embeds.shape[1])), stop_ids=())
        for _ in vlm.decode_tokens(embeds, cfg, stats, prefix):
            pass
        if i:
            encode.append(stats.encode_s)
            ttft.append(stats.encode_s + stats.time_to_first_token_s)
            tps.append(stats.decode_tokens_per_s)
    m = vlm.manifest
    size = sum(f["size"] for f in m["files"].values())
    res = {"bundle": str(bundle), "model": m["model"]["name"], "precision": m["precision"], "decoder": vlm.backend,
           "prompt_tokens": stats.prompt_tokens, "image_tokens": stats.image_tokens, "new_tokens": stats.new_tokens,
           "runs": runs, "load_s": round(load_s, 3),
           "encode_ms_median": 1000 * float(np.median(encode)), "ttft_ms_median": 1000 * float(np.median(ttft)),
           "decode_tok_s_median": float(np.median(tps)), "peak_rss_mib": round(_peak_mib(), 1),
           "rss_added_mib": round(max(0.0, _rss_mib() - base_rss), 1), "bundle_mb": round(size / 1e6, 2)}
    from .memory import status as memory_status

    res.update(memory_status())                     # weights in huge pages or not, and why (runtime.memory)
    res.update(getattr(vlm.decoder, "kernel", {}))  # ONNX Runtime decoders: whose kernel runs decode steps
    if hasattr(vlm.decoder, "weight_buffers"):      # llama.cpp: where the weights went (repacked or plain)
        res.update(llama_weight_buffers_mib=vlm.decoder.weight_buffers,
                   llama_repacked_weights=vlm.decoder.extra_buffers, llama_repacked_why=vlm.decoder.extra_buffers_why,
                   llama_gpu_layers=vlm.decoder.gpu_layers_why, llama_offloaded_layers=vlm.decoder.offloaded)
    # Agreement with eager PyTorch is not measured here (bench runs no eager model): it is what `edgevlm export`
    # measured on its parity prompt and recorded in the manifest. It is copied under its own key, named as such.
    # the export's parity records are keyed by decoder backend (runtime.vlm_ops.DECODERS), which a decoder that names
    # its runner more closely (coreml-reference) gives as parity_key
    par = {r["backend"]: r for r in m.get("parity", {}).get("results", [])}.get(
        getattr(vlm.decoder, "parity_key", vlm.backend))
    if par:
        res["export_parity"] = {
            "recorded": "by edgevlm export in the bundle manifest, not measured by this bench run",
            "created": m.get("created"), "prompt": m["parity"].get("prompt"), "backend": par["backend"],
            "precision": par.get("precision"), "new_tokens": par.get("new_tokens"),
            "same_greedy_tokens": par["same_greedy_tokens"],
            "teacher_forced_top1_agreement": par["teacher_forced_top1_agreement"], "kl_mean": par["kl_mean"]}
    vlm.close()
    if not quiet:
        cols = ["model", "precision", "decoder", "image_tokens", "prompt_tokens", "ttft_ms_median",
                "decode_tok_s_median", "peak_rss_mib", "huge_pages_mib", "bundle_mb"]
        print(table([res], cols, title=f"edgevlm bench {bundle} ({runs} runs of {res['new_tokens']} new tokens; "
                                       "ttft = image encoding + prefill)"))
        if par:
            ep = res["export_parity"]
            print(f"recorded at export (manifest, {ep['created']}; not measured by this run): {ep['backend']} "
                  f"{ep['precision']} vs eager PyTorch over {ep['new_tokens']} greedy tokens: same tokens "
                  f"{'yes' if ep['same_greedy_tokens'] else 'no'}, teacher-forced top-1 "
                  f"{ep['teacher_forced_top1_agreement']:.3f}, KL mean {ep['kl_mean']:.2e}")
        else:
            print(f"recorded at export: no parity record for the {res['decoder']} decoder in the manifest")
    out = Path(json_out) if json_out else Path("benchmarks/results") / f"bench-{Path(bundle).name}.json"
    write_json(out, res)
    if not quiet:
        if res["huge_pages_why_not"]:
            print(f"huge pages: off, {res['huge_pages_why_not']} (edgevlm.runtime.memory)")
        if "decode_kernel" in res:
            why = res.get("decode_kernel_why")
            print(f"decode steps: {res['decode_kernel']}" + (f" ({why})" if why else
                  f", {res['decode_kernel_layers']} matrices, attention by {res.get('decode_attention', '?')}, "
                  f"checked at load against ONNX Runtime's kernels: max logit difference "
                  f"{res['decode_kernel_check_rel_diff']:.1e} of their scale"))
        print(f"wrote {out}")
    return res
