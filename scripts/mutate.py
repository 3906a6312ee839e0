"""`make mutate`: small deliberate bugs in the product's promises, each in a fresh clone, each run
against the tests that guard it. A mutation the tests miss ("survived") is a hole in the suite.

    python scripts/mutate.py                 # every mutation (slow: Ray tests take minutes each)
    python scripts/mutate.py --fast          # only mutations whose guarding tests need no Ray
    python scripts/mutate.py -k checkpoint   # mutations whose name contains "checkpoint"
    python scripts/mutate.py --list          # the list, without running anything
    python scripts/mutate.py -j 1            # one at a time (default: 2 at once)

Each mutation replaces one exact piece of text in one file (it must occur exactly once, so the
list breaks loudly when the code moves: "does not apply"). The clone is of the committed HEAD,
so commit before running. Exit status 1 if any mutation survived or no longer applies.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, -k expressions
    ray: bool = False  # the guarding tests start a Ray head (minutes)


M = Mutation
MUTATIONS = [
    # --- checkpoints -------------------------------------------------------------------------
    M(
        "checkpoint: weights_only off",
        "placesnet/checkpoint_files.py",
        "torch.load(path, map_location=device, weights_only=True)",
        "torch.load(path, map_location=device, weights_only=False)",
        ("tests/test_promises.py", "-k", "pickle"),
    ),
    M(
        "checkpoint: best of a run dir is the worst",
        "placesnet/checkpoint.py",
        "return max(candidates, key=lambda d: (checkpoint_score(",
        "return min(candidates, key=lambda d: (checkpoint_score(",
        ("tests/test_reliability.py", "-k", "best_checkpoint"),
    ),
    M(
        "checkpoint: sha256 not compared",
        "placesnet/checkpoint_files.py",
        'if checksums and _sha256(fs, info.path) != expected.get("sha256"):',
        "if False:",
        ("tests/test_reliability.py", "-k", "checksums"),
    ),
    M(
        "checkpoint: size not compared",
        "placesnet/checkpoint_files.py",
        'if info.size != expected.get("bytes"):',
        "if False:",
        ("tests/test_reliability.py", "-k", "checksums"),
    ),
    M(
        "resume: broken checkpoints not set aside",
        "placesnet/launch/resume.py",
        "            self.fs.move(path, target)\n",
        "            pass\n",
        ("tests/test_reliability.py", "-k", "broken_newest"),
    ),
    M(
        "resume: Ray's snapshot not rewritten",
        "placesnet/launch/resume.py",
        "        _write_snapshot(run, keep)\n",
        "        pass\n",
        ("tests/test_reliability.py", "-k", "broken_newest or garbage_snapshot"),
    ),
    M(
        "resume: newest intact is the oldest",
        "placesnet/launch/resume.py",
        "    newest = keep[-1]\n",
        "    newest = keep[0]\n",
        ("tests/test_reliability.py", "-k", "broken_newest or intact_run"),
    ),
    # --- the epoch loop ----------------------------------------------------------------------
    M(
        "divergence: inf not caught",
        "placesnet/train/engine.py",
        "        finite = torch.isfinite(loss)\n",
        "        finite = ~torch.isnan(loss)\n",
        ("tests/test_promises.py", "-k", "infinite"),
    ),
    M(
        "divergence: local verdict only",
        "placesnet/train/engine.py",
        "            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)\n",
        "",
        ("tests/test_engine.py", "-k", "one_rank"),
    ),
    M(
        "metrics: train sums not all-reduced",
        "placesnet/train/engine.py",
        "    loss_sum, correct, seen, elapsed_sum, skipped = _all_reduce(",
        "    loss_sum, correct, seen, elapsed_sum, skipped = (lambda v, d: v)(",
        ("tests/test_promises.py", "-k", "two_ranks"),
    ),
    M(
        "metrics: confusion matrix not all-reduced",
        "placesnet/train/engine.py",
        "        for t in (loss_sum, counts, matrix):",
        "        for t in (loss_sum, counts):",
        ("tests/test_promises.py", "-k", "two_ranks"),
    ),
    M(
        "metrics: top-5 is top-1",
        "placesnet/train/engine.py",
        "hits.any(1).sum()",
        "hits[:, 0].sum()",
        ("tests/test_engine.py", "-k", "evaluate_counts"),
    ),
    M(
        "eval: DistributedSampler padding",
        "placesnet/evaluation.py",
        "sampler=ShardSampler(ds, rank, world_size)",
        "sampler=__import__('torch').utils.data.DistributedSampler(ds, world_size, rank, shuffle=False)",
        ("tests/test_promises.py", "-k", "two_ranks"),
    ),
    M(
        "bad images: fail policy skips",
        "placesnet/data/places.py",
        '        if self.mode == "fail":',
        '        if self.mode == "never":',
        ("tests/test_reliability.py", "-k", "fail_policy"),
    ),
    M(
        "bad images: skipped ones counted as seen",
        "placesnet/train/engine.py",
        "        n = targets.numel() - bad",
        "        n = targets.numel()",
        ("tests/test_reliability.py", "-k", "skip_policy or only_bad"),
    ),
    # --- one training step (#24) ----------------------------------------------------------------
    M(
        "step: the LR range test takes a plain step",
        "placesnet/train/lr_find.py",
        "        out = train_step(model, optimizer, images, targets, device, settings, scaler=scaler)",
        "        out = train_step(model, optimizer, images, targets, device, StepSettings(), scaler=scaler)",
        ("tests/test_step.py", "-k", "same_step"),
    ),
    M(
        "step: fit ignores the config's step",
        "placesnet/train/engine.py",
        "    settings = StepSettings.from_config(config, device)\n",
        "    settings = PLAIN\n",
        ("tests/test_step.py", "-k", "same_step"),
    ),
    M(
        "step: no label smoothing",
        "placesnet/train/step.py",
        "label_smoothing=settings.label_smoothing, ignore_index=IGNORED",
        "ignore_index=IGNORED",
        ("tests/test_step.py", "-k", "same_step"),
    ),
    M(
        "step: clipping skipped",
        "placesnet/train/step.py",
        "    if settings.clip_grad_norm:\n",
        "    if False:\n",
        ("tests/test_recipe.py", "-k", "clip"),
    ),
    M(
        "find_lr: a plain step, not the config's",
        "placesnet/train/lr_find.py",
        "        settings=settings,\n        suggest=suggest,",
        "        suggest=suggest,",
        ("tests/test_step.py", "-k", "find_lr"),
    ),
    M(
        "step settings: channels_last on the CPU",
        "placesnet/train/step.py",
        '            channels_last=cfg.channels_last and device.type == "cuda",',
        "            channels_last=cfg.channels_last,",
        ("tests/test_step.py", "-k", "settings_come"),
    ),
    M(
        "step settings: a GradScaler for bf16",
        "placesnet/train/step.py",
        "        return self.amp_dtype == torch.float16",
        "        return self.amp_dtype is not None",
        ("tests/test_step.py", "-k", "settings_come"),
    ),
    # --- recipe ------------------------------------------------------------------------------
    M(
        "schedule: warmup starts at the peak",
        "placesnet/train/optim.py",
        "        return (step + 1) / (warmup_steps + 1)",
        "        return 1.0",
        ("tests/test_recipe.py",),
    ),
    M(
        "schedule: cosine never decays",
        "placesnet/train/optim.py",
        "return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))",
        "return 1.0",
        ("tests/test_recipe.py",),
    ),
    M(
        "lr: no linear scaling",
        "placesnet/config.py",
        "return MODEL_LR[model] * batch_size / REFERENCE_BATCH",
        "return MODEL_LR[model]",
        ("tests/test_recipe.py",),
    ),
    M(
        "best epoch: ties not broken by val loss",
        "placesnet/config.py",
        "return metrics.get(METRIC, -1.0) - _LOSS_WEIGHT * loss",
        "return metrics.get(METRIC, -1.0)",
        ("tests/test_reliability.py", "-k", "best_checkpoint or tie"),
    ),
    M(
        "best epoch: ties go to the higher val loss",
        "placesnet/config.py",
        "return metrics.get(METRIC, -1.0) - _LOSS_WEIGHT * loss",
        "return metrics.get(METRIC, -1.0) + _LOSS_WEIGHT * loss",
        ("tests/test_reliability.py", "-k", "best_checkpoint or tie"),
    ),
    # --- workshop pictures and notes (#14) ------------------------------------------------------
    M(
        "curves: the latest epoch marked as best",
        "placesnet/plots.py",
        "    best = best_epoch(history)\n",
        "    best = history[-1] if history else None\n",
        ("tests/test_plots.py", "-k", "curves"),
    ),
    M(
        "sweep: random lr drawn uniformly",
        "placesnet/launch/sweep.py",
        '"lr": tune.loguniform(*lr_range)',
        '"lr": tune.uniform(*lr_range)',
        ("tests/test_sweep_config.py",),
    ),
    M(
        "sweep: --scheduler none still stops trials",
        "placesnet/launch/sweep.py",
        '    if scheduler == "none":\n        return None\n',
        "",
        ("tests/test_sweep_config.py",),
    ),
    M(
        "train: one worker shuffles differently from N",
        "placesnet/data/loaders.py",
        "GlobalBatches(len(dataset), batch_size, rank, world, seed)",
        "GlobalBatches(len(dataset), batch_size, rank, world, seed + world)",
        ("tests/test_promises.py", "-k", "same_weights"),
    ),
    M(
        "train: a large last batch dropped",
        "placesnet/data/loaders.py",
        "images % batch_size < batch_size / 2",
        "images % batch_size < batch_size",
        ("tests/test_data.py", "-k", "drops_only"),
    ),
    M(
        "sweep plot: the best trial shares the palette",
        "placesnet/plots.py",
        '            colours[row["trial_id"]] = BEST_COLOUR',
        '            colours[row["trial_id"]] = palette[-1]',
        ("tests/test_plots.py", "-k", "sweep"),
    ),
    M(
        "sweep plot: early stops not marked",
        "placesnet/plots.py",
        '        if early or row["status"] == "interrupted":',
        '        if row["status"] == "interrupted":',
        ("tests/test_plots.py", "-k", "sweep"),
    ),
    M(
        "confusion plot: rates instead of counts",
        "placesnet/plots.py",
        '        counts = [p["count"] for p in pairs][::-1]',
        '        counts = [p["rate"] for p in pairs][::-1]',
        ("tests/test_workshop.py", "-k", "confused"),
    ),
    M(
        "note: sample-data models say nothing",
        "placesnet/checkpoint.py",
        '    if config.dataset == "sample":',
        "    if False:",
        ("tests/test_workshop.py", "-k", "cannot_know"),
    ),
    M(
        "mistakes: least confident first",
        "placesnet/train/engine.py",
        "wrong = sorted(wrong, reverse=True)[:mistakes]",
        "wrong = sorted(wrong)[:mistakes]",
        ("tests/test_promises.py", "-k", "two_ranks"),
    ),
    M(
        "mistakes: not gathered across ranks",
        "placesnet/evaluation.py",
        "        if world_size > 1:",
        "        if False:",
        ("tests/test_promises.py", "-k", "two_ranks"),
    ),
    M(
        "model summary: conv FLOPs halved",
        "placesnet/summaries.py",
        "        return 2 * output[0].numel()",
        "        return output[0].numel()",
        ("tests/test_workshop.py", "-k", "model_summary_at"),
    ),
    M(
        "tensorboard: header stamped with the time",
        "placesnet/tensorboard.py",
        "    return _restamp_header(bytes(data))",
        "    return bytes(data)",
        ("tests/test_workshop.py", "-k", "tensorboard"),
    ),
    M(
        "checkpoint latest: the oldest run",
        "placesnet/checkpoint.py",
        "    return max(found, key=lambda p: (p.stat().st_mtime, str(p)))",
        "    return min(found, key=lambda p: (p.stat().st_mtime, str(p)))",
        ("tests/test_reliability.py", "-k", "latest"),
    ),
    M(
        "help: docstring continuations collapsed",
        "rayjobs/evaluate.py",
        'r"""Evaluate a checkpoint: exact',
        '"""Evaluate a checkpoint: exact',
        ("tests/test_cli_errors.py", "-k", "continuations"),
    ),
    M(
        "ray_head.py: the job agent on Ray's fixed port",
        "scripts/ray_head.py",
        '"--dashboard-agent-listen-port",\n        "0",\n',
        "",
        ("tests/test_ray_head.py",),
        ray=True,
    ),
    M(
        "serve: lone requests wait in the batch queue",
        "placesnet/serve/replica.py",
        "if self.options.adaptive_batching and self.in_flight == 1:",
        "if False:",
        ("tests/test_serve.py", "-k", "lone"),
        ray=True,
    ),
    M(
        "serve: a wrong token accepted",
        "placesnet/serve/auth.py",
        'if scheme.lower() != "bearer" or not hmac.compare_digest(',
        'if scheme.lower() != "bearer" and not hmac.compare_digest(',
        ("tests/test_serve_core.py", "-k", "same_verdict"),
    ),
    M(
        "serve: a decode thread per machine CPU",
        "placesnet/serve/replica.py",
        'ThreadPoolExecutor(threads, thread_name_prefix="decode")',
        'ThreadPoolExecutor(None, thread_name_prefix="decode")',
        ("tests/test_serve.py", "-k", "info_routes"),
        ray=True,
    ),
    M(
        "serve: autoscaling stuck at min_replicas",
        "serving/app.py",
        '"max_replicas": options.max_replicas,',
        '"max_replicas": options.min_replicas,',
        ("tests/test_serve.py", "-k", "reach_the_deployment"),
        ray=True,
    ),
    M(
        "serve: upscale delay left at Serve's 30 s",
        "serving/app.py",
        '"upscale_delay_s": options.upscale_delay_s,',
        "",
        ("tests/test_serve.py", "-k", "reach_the_deployment"),
        ray=True,
    ),
    M(
        "serve: autoscaling blind to load",
        "serving/app.py",
        '"target_ongoing_requests": options.target_ongoing_requests,',
        '"target_ongoing_requests": 10**6,',
        ("tests/test_faults.py", "-k", "scale_up"),
        ray=True,
    ),
    M(
        "serve: gRPC skips the token",
        "placesnet/serve/grpc_api.py",
        'replica.authorize(dict(grpc_context.invocation_metadata()).get("authorization", ""))',
        "pass",
        ("tests/test_serve_core.py", "-k", "same_verdict"),
    ),
    M(
        "serve: gRPC answers out of order",
        "placesnet/serve/grpc_api.py",
        "for r in answer.results",
        "for r in answer.results[::-1]",
        ("tests/test_serve_core.py", "-k", "same_answer"),
    ),
    M(
        "serve gpu decode: pixel limit checked after nvJPEG",
        "placesnet/data/gpudecode.py",
        "                    and img.size[0] * img.size[1] <= max_pixels\n",
        "",
        ("tests/test_gpudecode.py", "-k", "uploads_decode_like"),
    ),
    M(
        "serve gpu decode: answers out of order",
        "placesnet/data/gpudecode.py",
        "for i, image in zip(fast, decoded):",
        "for i, image in zip(fast, decoded[::-1]):",
        ("tests/test_gpudecode.py", "-k", "uploads_decode_like"),
    ),
    M(
        "serve gpu decode: a request's uploads one by one",
        "placesnet/serve/replica.py",
        "decoded = iter(await asyncio.to_thread(self._decode_on_device, images, model))",
        "decoded = iter([(await asyncio.to_thread(self._decode_on_device, [d], model))[0] for d in images])",
        ("tests/test_gpudecode.py", "-k", "replica"),
    ),
    # --- data --------------------------------------------------------------------------------
    M(
        "data check: label == classes accepted",
        "placesnet/data/validate.py",
        "elif not 0 <= int(label) < num_classes:",
        "elif not 0 <= int(label) <= num_classes:",
        ("tests/test_reliability.py", "-k", "bad_list_lines"),
    ),
    M(
        "data check: duplicates accepted",
        "placesnet/data/validate.py",
        "            if image in seen:",
        "            if False:",
        ("tests/test_reliability.py", "-k", "bad_list_lines"),
    ),
    M(
        "data check: empty files accepted",
        "placesnet/data/validate.py",
        'return "is empty (0 bytes)" if size == 0 else None',
        "return None",
        ("tests/test_reliability.py", "-k", "missing_and_empty"),
    ),
    M(
        "normalize: wrong scale",
        "placesnet/data/transforms.py",
        "return images.float().div_(255).sub_(MEAN[0]).div_(STD[0])",
        "return images.float().div_(256).sub_(MEAN[0]).div_(STD[0])",
        ("tests/test_data.py",),
    ),
    # --- options: flags come from TrainConfig's fields (#24) ----------------------------------
    M(
        "options: a field's flag dropped from the generator",
        "placesnet/cli.py",
        'if f.metadata["group"] != group:',
        'if f.metadata["group"] != group or f.name == "label_smoothing":',
        ("tests/test_options.py",),
    ),
    M(
        "options: switches do not reach the config",
        "placesnet/cli.py",
        "for f in fields if hasattr(args, f.name)}",
        'for f in fields if hasattr(args, f.name) and f.type != "bool"}',
        ("tests/test_options.py",),
    ),
    M(
        "options: range bounds not checked",
        "placesnet/config.py",
        "if below is not None and not low <= value < below:",
        "if False:",
        ("tests/test_options.py", "-k", "validated"),
    ),
    M(
        "options: --no- switch flag not derived",
        "placesnet/config.py",
        'return f"--no-{dashed}" if _FIELDS[name].default is True else f"--{dashed}"',
        'return f"--{dashed}"',
        ("tests/test_options.py",),
    ),
    M(
        "options: validate message names the field, not the flag",
        "placesnet/config.py",
        'raise UserError(f"{flag(f.name)} must be >= {low:g}, got {value}")',
        'raise UserError(f"{f.name} must be >= {low:g}, got {value}")',
        ("tests/test_options.py", "-k", "names_the_flag"),
    ),
    M(
        "options: per-dataset batch default lost",
        "placesnet/config.py",
        '"batch_size": _dataset_default("batch_size"),',
        '"batch_size": lambda values: 64,',
        ("tests/test_options.py",),
    ),
    # --- one driver setup (#24) ----------------------------------------------------------------
    M(
        "driver: --name ../escape accepted",
        "placesnet/launch/driver.py",
        '    if "/" in name or "\\\\" in name or name in ("", ".", ".."):',
        '    if name in ("", ".", ".."):',
        ("tests/test_cli_errors.py", "-k", "outside"),
    ),
    M(
        "sweep: trial checkpoints looked up under Path(storage)/name (file:// breaks)",
        "placesnet/launch/sweep.py",
        '        train_dir = storage.fs_path(name, "train", str(trial_id))',
        '        train_dir = str(Path(storage.uri) / name / "train" / str(trial_id))',
        ("tests/test_sweep.py", "-k", "results_table"),
        ray=True,
    ),
    M(
        "driver: printed/best.json paths are file:// URIs serve cannot read",
        "placesnet/launch/driver.py",
        "        if self.is_local:\n            return fs_path\n        return self.label(",
        "        return self.label(",
        ("tests/test_sweep.py", "-k", "printed_paths or best_json"),
        ray=True,
    ),
    M(
        "driver: no resume check for file:// storage",
        "placesnet/launch/driver.py",
        "        run_dir = self.storage.local_path(self.name)\n",
        '        run_dir = self.storage.local_path(self.name) if "://" not in self.storage.uri else None\n',
        ("tests/test_train_ray.py", "-k", "crash_recovery"),
        ray=True,
    ),
    # --- retries -------------------------------------------------------------------------------
    M(
        "retries: user errors retried",
        "placesnet/launch/trainer.py",
        "            return FailureDecision.RAISE\n        return super()",
        "            pass\n        return super()",
        ("tests/test_reliability.py", "-k", "retried"),
    ),
    # --- serve ---------------------------------------------------------------------------------
    M(
        "serve: 404 as {'detail'}",
        "placesnet/serve/http_api.py",
        '{"error": f"{exc.detail}: {request.method} {request.url.path}"},',
        '{"detail": exc.detail},',
        ("tests/test_promises.py", "-k", "json_errors"),
    ),
    M(
        "serve: no room check for 2 replicas",
        "placesnet/serve/options.py",
        "    return int(max(1, min(options.min_replicas, options.max_replicas, fits)))",
        "    return int(options.min_replicas)",
        ("tests/test_promises.py", "-k", "replicas"),
    ),
    M(
        "summary: best checkpoint is the latest",
        "placesnet/launch/outputs.py",
        '    best = result.get_best_checkpoint(SCORE, "max")',
        "    best = result.checkpoint",
        ("tests/test_reliability.py", "-k", "summary"),
    ),
    M(
        "serve options: nan and inf accepted",
        "placesnet/serve/options.py",
        "if not math.isfinite(number) or number < 0 or (number == 0 and not zero_ok):",
        "if number < 0 or (number == 0 and not zero_ok):",
        ("tests/test_serve_core.py", "-k", "bad_option"),
    ),
    M(
        "serve options: 1.5 replicas rounded down",
        "placesnet/serve/options.py",
        "    if not number.is_integer():  # 1.5 replicas: refused, not rounded down\n        raise refused\n",
        "",
        ("tests/test_serve_core.py", "-k", "bad_option"),
    ),
    M(
        "serve options: any value of a switch is on",
        "placesnet/serve/options.py",
        "value = raw if isinstance(raw, bool) else _BOOLS.get(str(raw).strip().lower())",
        "value = bool(raw)",
        ("tests/test_serve_core.py", "-k", "bad_option or typed"),
    ),
    M(
        "serve options: zero batch size accepted",
        "placesnet/serve/options.py",
        '    max_batch_size: int = _option(16, "the most images in one forward pass")',
        '    max_batch_size: int = _option(16, "the most images in one forward pass", zero_ok=True)',
        ("tests/test_serve_core.py", "-k", "bad_option"),
    ),
    M(
        "serve options: checked after the checkpoint",
        "serving/app.py",
        "        checkpoint, options = parse_args(args)\n        path = checkpoint_to_serve(checkpoint)",
        "        path = checkpoint_to_serve(str(args.get('checkpoint')))\n"
        "        checkpoint, options = parse_args(args)",
        ("tests/test_serve_core.py", "-k", "before_looking_at_the_checkpoint"),
    ),
    M(
        "serve status: too large is INVALID_ARGUMENT over gRPC",
        "placesnet/serve/errors.py",
        "    413: grpc.StatusCode.RESOURCE_EXHAUSTED,",
        "    413: grpc.StatusCode.INVALID_ARGUMENT,",
        ("tests/test_serve_core.py", "-k", "same_verdict"),
    ),
    M(
        "serve status: gRPC ignores the error's status",
        "placesnet/serve/grpc_api.py",
        "grpc_context.set_code(e.grpc_code)",
        "grpc_context.set_code(ClientError(400, '').grpc_code)",
        ("tests/test_serve_core.py", "-k", "same_verdict"),
    ),
    M(
        "serve status: 415 chosen by message text",
        "placesnet/serve/errors.py",
        "if isinstance(e.__context__, UnidentifiedImageError):",
        'if "not a recognised" in str(e):',
        ("tests/test_serve_core.py", "-k", "sorted_by_cause"),
    ),
    M(
        "serve status: not an image is a 400",
        "placesnet/serve/errors.py",
        "if isinstance(e.__context__, UnidentifiedImageError):",
        "if False:",
        ("tests/test_serve_core.py", "-k", "same_answer"),
    ),
    M(
        "serve status: a ClientError of any status",
        "placesnet/serve/errors.py",
        "        if status not in GRPC_CODES:  # a new status needs its gRPC code first\n",
        "        if False:\n",
        ("tests/test_serve_core.py", "-k", "needs_a_grpc_code"),
    ),
    M(
        "serve: multipart file count not checked",
        "placesnet/serve/body.py",
        "        options.check_request_size(len(uploads), 0)  # the size was checked as it streamed in\n",
        "",
        ("tests/test_serve_core.py", "-k", "same_verdict"),
    ),
    M(
        "serve: multipart keeps every field",
        "placesnet/serve/body.py",
        'if params[b"name"] == b"file" and b"filename" in params:',
        "if True:",
        ("tests/test_serve_core.py", "-k", "multipart"),
    ),
    # --- Ray end to end (minutes each) -----------------------------------------------------------
    M(
        "train: val padded by DistributedSampler",
        "placesnet/data/loaders.py",
        "sampler=ShardSampler(val_src, rank, world)",
        "sampler=torch.utils.data.DistributedSampler(val_src, world, rank, shuffle=False)",
        ("tests/test_faults.py", "-k", "skipped"),
        ray=True,
    ),
    M(
        "ddp: every worker takes the whole global batch",
        "placesnet/data/loaders.py",
        "            yield order[start : start + self.batch_size][self.rank :: self.world]",
        "            yield order[start : start + self.batch_size]",
        ("tests/test_data.py", "-k", "drops_only"),
    ),
    M(
        "train: --keep-checkpoints ignored",
        "placesnet/launch/trainer.py",
        "num_to_keep=keep, checkpoint_score_attribute",
        "num_to_keep=None, checkpoint_score_attribute",
        ("tests/test_train_ray.py", "-k", "two_worker_ddp"),
        ray=True,
    ),
    M(
        "quiet: Ray Train's PreemptionWatcher on",
        "placesnet/cli.py",
        'os.environ.get(PREEMPTION_WATCHER, "0")',
        'os.environ.get(PREEMPTION_WATCHER, "1")',
        ("tests/test_train_ray.py", "-k", "two_worker_ddp"),
        ray=True,
    ),
    M(
        "train: resume ignores the checkpoint",
        "placesnet/launch/worker.py",
        "    checkpoint = ray.train.get_checkpoint()\n",
        "    checkpoint = None\n",
        ("tests/test_train_ray.py", "-k", "crash_recovery"),
        ray=True,
    ),
    M(
        "raydata: val split equal=True (images dropped)",
        "placesnet/data/raydata.py",
        "val.streaming_split(world_size, equal=False,",
        "val.streaming_split(world_size, equal=True,",
        ("tests/test_multinode.py", "-k", "ray_data"),
        ray=True,
    ),
    M(
        "raydata: an undecodable image trains as a blank one",
        "placesnet/data/raydata.py",
        '            labels[i] = -(int(batch["index"][i]) + 1)\n',
        "            pass\n",
        ("tests/test_multinode.py", "-k", "ray_data"),
        ray=True,
    ),
    M(
        "raydata: workers may take every CPU",
        "placesnet/launch/resources.py",
        "if ray_data and spare < 1 and not autoscale:",
        "if ray_data and spare < 0 and not autoscale:",
        ("tests/test_train_ray.py", "-k", "cannot_place"),
        ray=True,
    ),
    M(
        "sweep: no decode CPU per ray-data trial",
        "placesnet/launch/sweep.py",
        "DRIVER_CPU + (1 if ray_data else 0)",
        "DRIVER_CPU",
        ("tests/test_sweep.py", "-k", "cannot_fit"),
        ray=True,
    ),
    M(
        "gpudecode: a broken file is not marked bad",
        "placesnet/data/gpudecode.py",
        "            targets[i] = -(int(indices[i]) + 1)\n",
        "            pass\n",
        ("tests/test_gpudecode.py",),
    ),
    M(
        "gpudecode: offsets are sizes, not ends",
        "placesnet/data/gpudecode.py",
        "torch.cumsum(sizes, 0, out=offsets[1:])",
        "offsets[1:] = sizes",
        ("tests/test_gpudecode.py",),
    ),
    M(
        "gpudecode: a failed batch is not retried file by file",
        "placesnet/data/gpudecode.py",
        "            decoded = [_decode_one(files[i], device) for i in jpegs]\n",
        "            decoded = [None for i in jpegs]\n",
        ("tests/test_gpudecode.py",),
    ),
    M(
        "config: --decode gpu accepted with --input ray-data",
        "placesnet/config.py",
        'if self.decode == "gpu" and self.input == "ray-data":',
        "if False:",
        ("tests/test_gpudecode.py", "tests/test_cli_errors.py", "-k", "decode or bad_flags"),
    ),
    # --- the endpoint in production (issue #26) ---------------------------------------------------
    M(
        "serve: load_checkpoint skips the checksums",
        "placesnet/checkpoint.py",
        "    problem = verify_checkpoint(directory)\n    if problem:\n"
        '        raise UserError(f"corrupt checkpoint: {directory}: {problem}")\n',
        "",
        ("tests/test_serve_core.py", "-k", "verifies"),
    ),
    M(
        "serve: a swapped-in model is not probed",
        "placesnet/serve/served.py",
        "        try:\n            served.probe()\n        except",
        "        try:\n            pass\n        except",
        ("tests/test_serve_core.py", "-k", "verifies or swaps"),
    ),
    M(
        "serve: a broken checkpoint replaces the running model",
        "placesnet/serve/replica.py",
        "                if current is None:\n                    raise\n",
        "                raise\n",
        ("tests/test_serve_core.py", "-k", "swaps"),
    ),
    M(
        "serve: a request in flight switches model mid-swap",
        "placesnet/serve/replica.py",
        "        model = model or self.current()\n        self.in_flight += 1",
        "        model = self.current()\n        self.in_flight += 1",
        ("tests/test_serve_core.py", "-k", "swaps"),
    ),
    M(
        "serve: promote keeps latest as resolved at start",
        "placesnet/serve/rollout.py",
        "    path = checkpoint_to_serve(spec)  # after the cluster's state: latest means now",
        "    path = checkpoint_to_serve(previous if spec.startswith('latest') and previous else spec)",
        ("tests/test_serve_rollout.py", "-k", "latest"),
        ray=True,
    ),
    M(
        "serve: promote sends without verifying",
        "placesnet/serve/rollout.py",
        "    load_checkpoint(path)  # on object storage: fetched here first, and verified after the"
        " download\n",
        "",
        ("tests/test_serve_rollout.py", "-k", "promote_refuses"),
        ray=True,
    ),
    M(
        "serve: promote returns before the replicas swapped",
        "placesnet/serve/rollout.py",
        "    replicas = _wait_for_swap(client, app, base, fingerprint, started + timeout)\n",
        "    replicas = 2\n",
        ("tests/test_serve_rollout.py", "-k", "promotion_under_load"),
        ray=True,
    ),
    M(
        "serve: build_app's refusal is a traceback in serve status",
        "serving/app.py",
        "        raise Refused(str(e)) from None",
        "        raise ValueError(str(e)) from None",
        ("tests/test_serve_rollout.py", "-k", "one_line"),
        ray=True,
    ),
    M(
        "serve: serve run over a live endpoint",
        "serving/app.py",
        "    refuse_serve_run_over_a_live_endpoint()\n",
        "",
        ("tests/test_serve_rollout.py", "-k", "serve_run_over"),
        ray=True,
    ),
    M(
        "serve: the shell's key not passed to the replicas",
        "serving/app.py",
        '    key = os.environ.get(options.api_key_env, "").strip() if options.api_key_env else ""',
        '    key = ""',
        ("tests/test_serve_cli.py", "-k", "deploying_shell"),
        ray=True,
    ),
    M(
        "serve metrics: a call site's reason dropped",
        "placesnet/serve/errors.py",
        "        reason = reason or DEFAULT_REASONS[status]\n",
        "        reason = DEFAULT_REASONS[status]\n",
        ("tests/test_endpoint_metrics.py", "-k", "names_its_reason"),
    ),
    M(
        "serve metrics: images per pass records the seconds",
        "placesnet/serve/metrics.py",
        "self._per_pass.observe(images)",
        "self._per_pass.observe(seconds)",
        ("tests/test_endpoint_metrics.py", "-k", "each_event"),
    ),
    M(
        "serve metrics: probes counted as forward passes",
        "placesnet/serve/replica.py",
        "        self.current().probe()\n",
        "        self.current().probe()\n        self.metrics.forward_pass(1, 0.0)\n",
        ("tests/test_serve_metrics.py",),
        ray=True,
    ),
    M(
        "serve bench: rollout on a Serve the driver started",
        "benchmarks/serve.py",
        "deploy_declaratively(client, app, options if started else None)",
        "serve.start(**options) if started else None\n            deploy_declaratively(client, app)",
        ("tests/test_benchmarks.py", "-k", "serve_benchmark_compares"),
        ray=True,
    ),
    M(
        "serve bench: rollout cut-over ratio against itself",
        "benchmarks/serve.py",
        'ratio(promoted["cut-over s"], rolled["cut-over s"])',
        'ratio(promoted["cut-over s"], promoted["cut-over s"])',
        ("tests/test_benchmarks.py", "-k", "serve_benchmark_compares"),
        ray=True,
    ),
    M(
        "batches: uneven shares not weighted",
        "placesnet/train/engine.py",
        "loss_weight=weigh(step - 1, targets.numel()) if weigh else 1.0,",
        "loss_weight=1.0,",
        ("tests/test_promises.py", "-k", "same_weights"),
    ),
    M(
        "batches: each rank shuffles on its own",
        "placesnet/data/loaders.py",
        "g.manual_seed(self.seed + self.epoch)",
        "g.manual_seed(self.seed + self.epoch + self.rank)",
        ("tests/test_data.py", "-k", "global_batches"),
    ),
    # --- object storage (issue #25) ------------------------------------------------------------
    M(
        "storage: resume repair skipped on remote storage",
        "placesnet/launch/driver.py",
        "            plan = prepare_resume(self.storage.fs_path(self.name), self.storage.filesystem)\n",
        "            from placesnet.launch.resume import ResumePlan\n\n            return ResumePlan()\n",
        ("tests/test_object_storage.py", "-k", "repair_runs"),
    ),
    M(
        "storage: a fetched checkpoint not verified",
        "placesnet/remote.py",
        "        problem = verify_checkpoint(tmp)\n",
        "        problem = None\n",
        ("tests/test_object_storage.py", "-k", "fetched"),
    ),
    M(
        "resume: a lost attempt's unlisted checkpoint adopted",
        "placesnet/launch/resume.py",
        "        if c.name not in listed and c.epoch <= newest_recorded:\n",
        "        if False:\n",
        ("tests/test_object_storage.py", "-k", "lost_attempts"),
    ),
    M(
        "resume on S3: the resumed checkpoint's sha256 not checked",
        "placesnet/launch/resume.py",
        "    while keep and not run.local:",
        "    while False:",
        ("tests/test_object_storage.py", "-k", "repair_runs"),
    ),
    M(
        "serve: replicas get the driver's cache path, not the URI",
        "placesnet/serve/rollout.py",
        "    return path\n\n\ndef refuse_serve_run",
        "    from placesnet.checkpoint import resolve_checkpoint\n\n"
        "    return str(resolve_checkpoint(path))\n\n\ndef refuse_serve_run",
        ("tests/test_object_storage.py", "-k", "serve_gives"),
        ray=True,
    ),
    # --- a lost node (issue #25) ---------------------------------------------------------------
    M(
        "node loss: placement retries unbounded",
        "placesnet/launch/trainer.py",
        "        if fits < wanted or self.placement_timeouts > PLACEMENT_RETRIES:\n",
        "        if False:\n",
        ("tests/test_node_loss.py", "-k", "placement_time_outs"),
        ray=True,
    ),
    M(
        "node loss: a rerun epoch recorded twice (set-aside skipped)",
        "placesnet/launch/outputs.py",
        "        if isinstance(epoch, int) and epoch + 1 <= epochs_done:\n            continue",
        "        if True:\n            continue",
        ("tests/test_node_loss.py", "-k", "set_aside"),
    ),
    M(
        "node loss: driver keeps unrecorded checkpoints",
        "placesnet/launch/outputs.py",
        "    for line in set_aside_unrecorded(result):",
        "    for line in []:",
        ("tests/test_node_loss.py", "-k", "never_recorded"),
    ),
    M(
        "node loss: raw error instead of the one line",
        "rayjobs/train.py",
        "        lost = cluster_loss(e, res, started, name, args)\n",
        "        lost = None\n",
        ("tests/test_node_loss.py", "-k", "strict_spread"),
        ray=True,
    ),
    M(
        "elastic: the range ignored (a fixed run of MAX)",
        "placesnet/launch/resources.py",
        "num_workers=(self.min_workers, self.num_workers) if self.elastic else self.num_workers,",
        "num_workers=self.num_workers,",
        ("tests/test_node_loss.py", "-k", "elastic_range"),
        ray=True,
    ),
    M(
        "elastic: a lost node's placement time-out ends the run",
        "placesnet/launch/trainer.py",
        "        if res.elastic and res.fewest <= fits < wanted:",
        "        if False:",
        ("tests/test_node_loss.py", "-k", "placement_time_outs"),
        ray=True,
    ),
    M(
        "elastic: Ray's own policy (no resize lines, grows mid-epoch)",
        "placesnet/launch/trainer.py",
        '            kwargs["scaling_policy"] = ElasticOnLiveNodes(self.scaling_config, self.resources)\n',
        "",
        ("tests/test_node_loss.py", "-k", "grows_when_one_joins"),
        ray=True,
    ),
    # --- published Places365 models (issue #28) -----------------------------------------------
    M(
        "published: module. not stripped",
        "placesnet/published.py",
        'name = ".".join(part for part in key.split(".") if part != "module")',
        "name = key",
        ("tests/test_published.py", "-k", "keys_get or predicts_what and resnet18"),
    ),
    M(
        "published: DenseNet's old names not renamed",
        "placesnet/published.py",
        'out[_OLD_DENSENET.sub(r".\\1\\2.", name)] = value',
        "out[name] = value",
        ("tests/test_published.py", "-k", "keys_get or densenets"),
    ),
    M(
        "published: Python 2 strings without latin1",
        "placesnet/published.py",
        'weights_only=True, encoding="latin1")',
        "weights_only=True)",
        ("tests/test_published.py", "-k", "python2"),
    ),
    M(
        "published: key misfit not named",
        "placesnet/published.py",
        '    return "; ".join(parts) or None',
        "    return None",
        ("tests/test_published.py", "-k", "keys_do_not_fit"),
    ),
    M(
        "model: imported weights fed the workshop's normalisation",
        "placesnet/model.py",
        "return self.net((x - self.mean) / self.std)",
        "return self.net(x)",
        ("tests/test_published.py", "-k", "predicts_what and resnet18"),
    ),
    M(
        "views: the recorded transform ignored",
        "placesnet/data/views.py",
        "    if config.preprocess is None:\n        return eval_transform(config.image_size)",
        "    if True:\n        return eval_transform(config.image_size)",
        ("tests/test_published.py", "-k", "predicts_what and resnet18"),
    ),
    M(
        "serve: imported checkpoint served with the default transform",
        "placesnet/serve/served.py",
        "transform=single_view(loaded.config),",
        "transform=single_view(loaded.config.replace(preprocess=None)),",
        ("tests/test_published.py", "-k", "replica_answers"),
    ),
    M(
        "environment: threshold flipped (a tie is indoor)",
        "placesnet/environment.py",
        'return "indoor" if labels[top.cpu()].double().mean() < THRESHOLD else "outdoor"',
        'return "indoor" if labels[top.cpu()].double().mean() <= THRESHOLD else "outdoor"',
        ("tests/test_published.py", "-k", "official_io_labels"),
    ),
    M(
        "environment: top-5 instead of top-10",
        "placesnet/environment.py",
        "VOTERS = 10",
        "VOTERS = 5",
        ("tests/test_published.py", "-k", "official_io_labels"),
    ),
    M(
        "environment: indoor and outdoor swapped",
        "placesnet/environment.py",
        'return "indoor" if labels[top.cpu()].double().mean() < THRESHOLD else "outdoor"',
        'return "outdoor" if labels[top.cpu()].double().mean() < THRESHOLD else "indoor"',
        ("tests/test_published.py", "-k", "predict_cli_adds"),
    ),
    M(
        "replica: no environment in the answer",
        "placesnet/serve/replica.py",
        "return cls(name, model.top_k(probs, k), environment=model.environment(probs))",
        "return cls(name, model.top_k(probs, k))",
        ("tests/test_published.py", "-k", "replica_answers"),
    ),
    M(
        "predict.py: no environment",
        "rayjobs/predict.py",
        "    labels = io_labels(loaded.classes)  # None: not Places365's classes, no environment",
        "    labels = None",
        ("tests/test_published.py", "-k", "predict_cli_adds or predict_text"),
    ),
    M(
        "ten-crop: one crop, not the average",
        "placesnet/evaluation.py",
        "mean = probs.view(images, count, -1).mean(dim=1)",
        "mean = probs.view(images, count, -1)[:, 0]",
        ("tests/test_published.py", "-k", "ten_crop_evaluation"),
    ),
    M(
        "ten-crop: five crops (no mirrors)",
        "placesnet/data/views.py",
        "for view in TF.ten_crop(image, [self.crop])",
        "for view in TF.five_crop(image, [self.crop])",
        ("tests/test_published.py", "-k", "official_ten or ten_crop_evaluation"),
    ),
    M(
        "evaluate.py: --ten-crop ignored",
        "rayjobs/evaluate.py",
        "            ten_crop=args.ten_crop,\n        )\n    else:",
        "            ten_crop=False,\n        )\n    else:",
        ("tests/test_published.py", "-k", "evaluate_cli"),
    ),
    M(
        "old checkpoints: the project's models wrapped too",
        "placesnet/model.py",
        "    if config.preprocess is None:\n        return net",
        "    if config.preprocess is None:\n        return InputStats(net, (0.5,) * 3, (0.5,) * 3)",
        ("tests/test_published.py", "-k", "without_the_new_field or not_wrapped"),
    ),
    # --- batch prediction (issue #27) ---------------------------------------------------------
    M(
        "batch: a part written before its shard is complete (rows lost)",
        "placesnet/batch.py",
        "            if have == sizes[int(shard)]:",
        "            if have:",
        ("tests/test_batch_predict.py", "-k", "equal_predict_py"),
        ray=True,
    ),
    M(
        "batch: chunks overlap (rows twice)",
        "placesnet/batch.py",
        "            stop = min(start + CHUNK, end)",
        "            stop = min(start + CHUNK + 1, end)",
        ("tests/test_batch_predict.py", "-k", "equal_predict_py"),
        ray=True,
    ),
    M(
        "batch: the checkpoint's transform not used",
        "placesnet/batch.py",
        "    transform = single_view(TrainConfig.from_dict(config))",
        "    transform = single_view(TrainConfig())",
        ("tests/test_batch_predict.py", "-k", "equal_predict_py"),
        ray=True,
    ),
    M(
        "batch: unreadable files' errors dropped",
        "placesnet/batch.py",
        '    out["error"] = [e or None for e in rows["error"].values]',
        '    out["error"] = None',
        ("tests/test_batch_predict.py", "-k", "equal_predict_py"),
        ray=True,
    ),
    M(
        "batch: a resumed run predicts every shard again",
        "placesnet/batch.py",
        "    missing = sorted(set(sizes) - out.done())",
        "    missing = sorted(set(sizes))",
        ("tests/test_batch_predict.py", "-k", "killed_run"),
        ray=True,
    ),
    M(
        "batch: a killed run's parts not resumed (done shards forgotten)",
        "rayjobs/batch_predict.py",
        "    done = _done_images(out, total)\n",
        "    done = 0\n",
        ("tests/test_batch_predict.py", "-k", "killed_run or equal_predict_py"),
        ray=True,
    ),
    # --- class activation maps (issue #29) ---------------------------------------------------
    M(
        "cam: the class asked for ignored (top-1)",
        "placesnet/cam.py",
        "chosen = torch.as_tensor(classes, dtype=torch.long).to(device)",
        "chosen = logits.argmax(1)",
        ("tests/test_cam.py", "-k", "follow_the_class"),
    ),
    M(
        "cam: always class 0",
        "placesnet/cam.py",
        "chosen = torch.as_tensor(classes, dtype=torch.long).to(device)",
        "chosen = torch.zeros(len(classes), dtype=torch.long, device=device)",
        ("tests/test_cam.py", "-k", "follow_the_class"),
    ),
    M(
        "cam: DeepCNN's first conv stage",
        "placesnet/cam.py",
        "return [m for m in net.features if isinstance(m, nn.ReLU)][-1]",
        "return [m for m in net.features if isinstance(m, nn.ReLU)][0]",
        ("tests/test_cam.py", "-k", "quadrant_that_decides"),
    ),
    M(
        "cam: ResNet layer3",
        "placesnet/cam.py",
        "return net.layer4",
        "return net.layer3",
        ("tests/test_cam.py", "-k", "last_conv_stage or input_stats"),
    ),
    M(
        "cam: no ReLU",
        "placesnet/cam.py",
        "relu_attributions=True",
        "relu_attributions=False",
        ("tests/test_cam.py", "-k", "unit_range"),
    ),
    M(
        "cam: map transposed after upsampling",
        "placesnet/cam.py",
        "cams = cams[:, 0].float()",
        "cams = cams[:, 0].float().transpose(1, 2)",
        ("tests/test_cam.py", "-k", "mirrored"),
    ),
    M(
        "cam: map transposed before upsampling",
        "placesnet/cam.py",
        "LayerAttribution.interpolate(cams.detach(),",
        "LayerAttribution.interpolate(cams.detach().transpose(2, 3),",
        ("tests/test_cam.py", "-k", "mirrored"),
    ),
    M(
        "cam: H and W swapped",
        "placesnet/cam.py",
        "size = tuple(x.shape[-2:])",
        "size = tuple(x.shape[-2:])[::-1]",
        ("tests/test_cam.py", "-k", "last_conv_stage"),
    ),
    M(
        "cam: zero map divided by zero",
        "placesnet/cam.py",
        "torch.where(peak > 0, cams / peak.clamp(min=torch.finfo(cams.dtype).tiny), 0.0)",
        "cams / peak",
        ("tests/test_cam.py", "-k", "without_evidence"),
    ),
    M(
        "cam: training modes not restored",
        "placesnet/cam.py",
        "            m.training = mode\n",
        "            pass\n",
        ("tests/test_cam.py", "-k", "leaves"),
    ),
    M(
        "cam: requires_grad not restored",
        "placesnet/cam.py",
        "p.requires_grad_(r)",
        "p.requires_grad_(True)",
        ("tests/test_cam.py", "-k", "leaves"),
    ),
    M(
        "cam: explained in training mode",
        "placesnet/cam.py",
        "    model.eval()\n    try:",
        "    try:",
        ("tests/test_cam.py", "-k", "leaves"),
    ),
    M(
        "cam: probability of the top class",
        "placesnet/cam.py",
        ".softmax(1).gather(1, chosen[:, None])[:, 0]",
        ".softmax(1).amax(1)",
        ("tests/test_cam.py", "-k", "follow_the_class"),
    ),
    M(
        "cam: fallback takes the first conv child",
        "placesnet/cam.py",
        "    return with_conv[-1]",
        "    return with_conv[0]",
        ("tests/test_cam.py", "-k", "another"),
    ),
    M(
        "overlay: colormap reversed",
        "placesnet/plots.py",
        "(heat.clamp(0, 1).numpy())",
        "((1 - heat.clamp(0, 1)).numpy())",
        ("tests/test_cam.py", "-k", "overlay"),
    ),
    M(
        "overlay: map transposed",
        "placesnet/plots.py",
        'size=(h, w), mode="bilinear")[0, 0]',
        'size=(w, h), mode="bilinear")[0, 0].T',
        ("tests/test_cam.py", "-k", "overlay"),
    ),
    M(
        "cam figure: no probability in the title",
        "placesnet/plots.py",
        'panel.suptitle(f"{pretty(label)}  {probability:.1%}"',
        'panel.suptitle(f"{pretty(label)}"',
        ("tests/test_cam.py", "-k", "cam_figure"),
    ),
    M(
        "cam figure: bare map instead of the overlay",
        "placesnet/plots.py",
        "ax_cam.imshow(overlay(image, heatmap))",
        "ax_cam.imshow(torch.as_tensor(heatmap).numpy(), cmap=CAM_COLORMAP)",
        ("tests/test_cam.py", "-k", "cam_figure"),
    ),
    M(
        "explain benchmark: ratio upside down",
        "benchmarks/explain.py",
        '"explain vs forward": ratio(explain_s, forward_s),',
        '"explain vs forward": ratio(forward_s, explain_s),',
        ("tests/test_benchmarks.py", "-k", "explain"),
    ),
    M(
        "explain: the overlay is of the top-1 class whatever ?class= asks",
        "placesnet/serve/replica.py",
        "heatmaps = model.heatmaps(batch, [_explained_class(e, p) for e, p in zip(explain, probs)])",
        "heatmaps = model.heatmaps(batch, [int(p.argmax()) for p in probs])",
        ("tests/test_serve_core.py", "-k", "explain"),
    ),
    M(
        "explain: ?class= ignored",
        "placesnet/serve/replica.py",
        "return int(probs.argmax()) if explain == TOP_1 else explain",
        "return int(probs.argmax())",
        ("tests/test_serve_core.py", "-k", "explain"),
    ),
    M(
        "explain: no key check",
        "placesnet/serve/http_api.py",
        '            replica.authorize(request.headers.get("authorization", ""))\n'
        "            model = replica.current()  # the whole request is answered by this one\n"
        "            k = replica.check_top_k(top_k, model)\n"
        "            target = ",
        "            model = replica.current()  # the whole request is answered by this one\n"
        "            k = replica.check_top_k(top_k, model)\n"
        "            target = ",
        ("tests/test_serve_core.py", "-k", "explain"),
    ),
    M(
        "explain: X-Predictions not the image's top-k",
        "placesnet/serve/http_api.py",
        'headers["X-Predictions"] = _compact(result.predictions)',
        'headers["X-Predictions"] = _compact(result.predictions[:1])',
        ("tests/test_serve_core.py", "-k", "explain"),
    ),
    M(
        "cam: the map of the unnormalised view",
        "placesnet/evaluation.py",
        "part = normalize(batch[start : start + batch_size].to(device))",
        "part = batch[start : start + batch_size].to(device).float()",
        ("tests/test_explain.py", "-k", "normalised"),
    ),
    M(
        "predict --cam: --cam-class ignored",
        "rayjobs/predict.py",
        "items = explain_images(loaded, list(images.values()), target, device)",
        "items = explain_images(loaded, list(images.values()), None, device)",
        ("tests/test_explain.py", "-k", "predict_cam"),
    ),
    M(
        "predict --cam: drawn without --plot",
        "rayjobs/predict.py",
        "    if args.cam and not args.plot:\n",
        "    if False:\n",
        ("tests/test_explain.py", "-k", "predict_cam"),
    ),
    M(
        "gallery: true and predicted maps swapped",
        "placesnet/evaluation.py",
        '            "true_map": t,\n            "predicted_map": pr,\n',
        '            "true_map": pr,\n            "predicted_map": t,\n',
        ("tests/test_explain.py", "-k", "mistake or gallery"),
    ),
    M(
        "gallery: each overlay drawn under the other class's title",
        "placesnet/plots.py",
        'ax.imshow(overlay(m["view"], m[f"{which}_map"]))',
        'ax.imshow(overlay(m["view"], m["predicted_map" if which == "true" else "true_map"]))',
        ("tests/test_explain.py", "-k", "mistake or gallery"),
    ),
    M(
        "gallery: evaluate.py draws no maps",
        "rayjobs/evaluate.py",
        'mistakes = explain_mistakes(loaded, result.pop("mistakes", []), device)',
        'mistakes = result.pop("mistakes", [])',
        ("tests/test_explain.py", "-k", "evaluate_writes"),
    ),
    M(
        "batch --cam: an overlay for an unreadable image",
        "placesnet/batch.py",
        "                    if len(png):  # an error row has none\n",
        "                    if True:\n",
        ("tests/test_batch_predict.py", "-k", "top_k_equal"),
        ray=True,
    ),
    M(
        "batch --cam: the first image of each batch gets none",
        "placesnet/batch.py",
        "for row, view, heatmap in zip(np.flatnonzero(ok), views, heatmaps):",
        "for row, view, heatmap in list(zip(np.flatnonzero(ok), views, heatmaps))[1:]:",
        ("tests/test_batch_predict.py", "-k", "top_k_equal"),
        ray=True,
    ),
    M(
        "batch --cam: the map of the least probable class",
        "placesnet/batch.py",
        "heatmaps = batch_heatmaps(self.loaded, views, probs.argmax(1).tolist(), self.device)",
        "heatmaps = batch_heatmaps(self.loaded, views, probs.argmin(1).tolist(), self.device)",
        ("tests/test_batch_predict.py", "-k", "top_k_equal"),
        ray=True,
    ),
    # --- fine-tuning (issue #28 point 3) ------------------------------------------------------
    M(
        "fine-tune: head kept when the classes differ",
        "placesnet/finetune.py",
        "kept = init.classes == list(classes)",
        "kept = len(init.classes) == len(classes)",
        ("tests/test_finetune.py", "-k", "load_init_keeps"),
    ),
    M(
        "fine-tune: head replaced when the classes are the same",
        "placesnet/finetune.py",
        "kept = init.classes == list(classes)",
        "kept = False",
        ("tests/test_finetune.py", "-k", "load_init_keeps"),
    ),
    M(
        "fine-tune: head is the output layer only",
        "placesnet/model.py",
        "    return head  # in the order named_modules() gives: the order the layers are built in",
        "    return head[-1:]",
        ("tests/test_finetune.py", "-k", "head"),
    ),
    M(
        "fine-tune: frozen backbone trains",
        "placesnet/model.py",
        "p.requires_grad_(False)",
        "p.requires_grad_(True)",
        ("tests/test_finetune.py", "-k", "frozen or freezes"),
    ),
    M(
        "fine-tune: plain fit ignores --freeze-backbone",
        "placesnet/train/engine.py",
        "    if config.freeze_backbone:\n        freeze_backbone(model)\n",
        "",
        ("tests/test_finetune.py", "-k", "freezes"),
    ),
    M(
        "fine-tune: frozen parameters still optimised",
        "placesnet/train/engine.py",
        'trained = [p for p in group["params"] if p.requires_grad]',
        'trained = list(group["params"])',
        ("tests/test_finetune.py", "-k", "frozen or freezes"),
    ),
    M(
        "fine-tune: backbone lr multiplier ignored",
        "placesnet/train/engine.py",
        '"lr": group["lr"] * backbone_lr_mult,',
        '"lr": group["lr"],',
        ("tests/test_finetune.py", "-k", "backbone_steps"),
    ),
    M(
        "fine-tune: groups only when frozen",
        "placesnet/train/engine.py",
        "    if config.freeze_backbone or config.backbone_lr_mult != 1.0:",
        "    if config.freeze_backbone:",
        ("tests/test_finetune.py", "-k", "backbone_steps"),
    ),
    M(
        "fine-tune: metrics' lr is the backbone's",
        "placesnet/train/engine.py",
        'return [g for g in heads + backbones if g["params"]]',
        'return [g for g in backbones + heads if g["params"]]',
        ("tests/test_finetune.py", "-k", "backbone_steps"),
    ),
    M(
        "fine-tune: transform not inherited",
        "placesnet/finetune.py",
        "return cfg.replace(preprocess=init.config.preprocess).validate()",
        "return cfg.validate()",
        ("tests/test_finetune.py", "-k", "takes_its_architecture"),
    ),
    M(
        "fine-tune: a conflicting --model accepted",
        "placesnet/finetune.py",
        "elif name in ARCHITECTURE and given != theirs:",
        "elif False:",
        ("tests/test_finetune.py", "-k", "cannot_change"),
    ),
    M(
        "fine-tune: --lr auto accepted",
        "placesnet/finetune.py",
        '    if args.lr == "auto":',
        "    if False:",
        ("tests/test_finetune.py", "-k", "cannot_change"),
    ),
    M(
        "fine-tune: licence and citation not carried forward",
        "placesnet/finetune.py",
        "**{key: theirs[key] for key in ATTRIBUTION if key in theirs},",
        "",
        ("tests/test_finetune.py", "-k", "carried_forward"),
    ),
    M(
        "fine-tune: flags without --init-from accepted",
        "placesnet/config.py",
        "bool(self.init_from) or not (self.freeze_backbone or self.backbone_lr_mult != 1.0),",
        "True,",
        ("tests/test_finetune.py", "-k", "need_a_checkpoint"),
    ),
    M(
        "fine-tune: ray-data with a model's own transform accepted",
        "placesnet/config.py",
        'self.preprocess is None or (self.input == "loader" and self.decode != "gpu"),',
        "True,",
        ("tests/test_finetune.py", "-k", "cannot_change"),
    ),
    M(
        "fine-tune: init weights ignored",
        "placesnet/launch/worker.py",
        "        source, line = load_init(net, cfg.init_from, classes)",
        "        source, line = load_init(build_model(cfg, len(classes)), cfg.init_from, classes)",
        ("tests/test_finetune.py", "-k", "trained_run_starts"),
        ray=True,
    ),
    M(
        "fine-tune: a resumed run loads --init-from again",
        "placesnet/launch/worker.py",
        "if cfg.init_from and not checkpoint:",
        "if cfg.init_from:",
        ("tests/test_finetune.py", "-k", "trained_run_starts"),
        ray=True,
    ),
    M(
        "fine-tune: resumed checkpoints lose the record",
        "placesnet/launch/worker.py",
        'start_epoch, history, source = meta["epoch"] + 1, meta["history"], meta.get("source")',
        'start_epoch, history = meta["epoch"] + 1, meta["history"]',
        ("tests/test_finetune.py", "-k", "trained_run_starts"),
        ray=True,
    ),
    M(
        "fine-tune: summary.json without the record",
        "placesnet/launch/outputs.py",
        '        **({"source": best_meta["source"]} if best_meta.get("source") else {}),\n',
        "",
        ("tests/test_finetune.py", "-k", "trained_run_starts"),
        ray=True,
    ),
    M(
        "fine-tune: a resume may change the optimizer's groups",
        "rayjobs/train.py",
        "changed = [k for k in (*ARCHITECTURE, *GROUPS) if",
        "changed = [k for k in ARCHITECTURE if",
        ("tests/test_finetune.py", "-k", "trained_run_starts"),
        ray=True,
    ),
    M(
        "fine-tune: the worker ignores --freeze-backbone",
        "placesnet/launch/worker.py",
        "    if cfg.freeze_backbone:  # before DDP, which syncs only what requires gradients\n"
        "        freeze_backbone(net)\n",
        "",
        ("tests/test_finetune.py", "-k", "own_transform_fine_tunes"),
        ray=True,
    ),
    M(
        "fine-tune: val through the project's transform",
        "placesnet/launch/worker.py",
        'val_ds = open_split(cfg, "val", root, transform=view)',
        'val_ds = open_split(cfg, "val", root)',
        ("tests/test_finetune.py", "-k", "own_transform_fine_tunes"),
        ray=True,
    ),
    M(
        "train: val with each rank's own BatchNorm statistics",
        "placesnet/launch/worker.py",
        "        engine.broadcast_buffers(model)\n",
        "",
        ("tests/test_finetune.py", "-k", "own_transform_fine_tunes"),
        ray=True,
    ),
    M(
        "published: /predict drops the environment",
        "placesnet/serve/replica.py",
        '**({"environment": self.environment} if self.environment else {}),',
        "",
        ("tests/test_published.py", "-k", "indoor_or_outdoor_per_image"),
    ),
    M(
        "published: ten-crop mistakes of rank 0 only",
        "placesnet/evaluation.py",
        "            found = [m for part in everyone for m in part]",
        "            found = everyone[0]",
        ("tests/test_published.py", "-k", "two_ray_workers"),
        ray=True,
    ),
    # --- the web page (issue #30) ------------------------------------------------------------
    M(
        "page: a class name inserted as HTML",
        "placesnet/serve/static/page.js",
        "label.textContent = prediction.label;",
        "label.innerHTML = prediction.label;",
        ("tests/test_web_page.py", "-k", "photos"),
        ray=True,
    ),
    M(
        "page: no Content-Security-Policy",
        "placesnet/serve/page.py",
        'SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}',
        'SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff"}',
        ("tests/test_web_page.py", "-k", "policy"),
        ray=True,
    ),
    M(
        "page: the policy only where it is exempt",
        "placesnet/serve/page.py",
        "path.removeprefix(root) in self.exempt",
        "path.removeprefix(root) not in self.exempt",
        ("tests/test_web_page.py", "-k", "policy"),
        ray=True,
    ),
    M(
        "page: the key kept in localStorage",
        "placesnet/serve/static/page.js",
        '  apiKey = $("#key-input").value.trim();',
        '  apiKey = $("#key-input").value.trim();\n  localStorage.setItem("placesnet-key", apiKey);',
        ("tests/test_web_page.py", "-k", "asks_for"),
        ray=True,
    ),
    M(
        "page: never told the endpoint has a key",
        "placesnet/serve/http_api.py",
        "index_html(needs_key=self.replica.api_key is not None)",
        "index_html(needs_key=False)",
        ("tests/test_web_page.py", "-k", "key"),
        ray=True,
    ),
    M(
        "page: a wrong key not said",
        "placesnet/serve/static/page.js",
        "had ? `Wrong key: the endpoint refused it",
        "false ? `Wrong key: the endpoint refused it",
        ("tests/test_web_page.py", "-k", "asks_for"),
        ray=True,
    ),
    M(
        "page: answers out of order",
        "placesnet/serve/static/page.js",
        '$("#results").append(item);',
        '$("#results").prepend(item);',
        ("tests/test_web_page.py", "-k", "photos"),
        ray=True,
    ),
    M(
        "page: a refusal without its message",
        "placesnet/serve/static/page.js",
        "`Refused (${error.status}): ${error.message}`",
        "`Refused (${error.status})`",
        ("tests/test_web_page.py", "-k", "photos"),
        ray=True,
    ),
    M(
        "tensorboard: the remote copy command without its folder",
        "placesnet/launch/driver.py",
        '        f"mkdir -p {local} && "\n',
        "",
        ("tests/test_object_storage.py", "-k", "interrupted_killed"),
        ray=True,
    ),
    M(
        "serve it: the printed command without the app's name",
        "placesnet/launch/driver.py",
        'SERVE = "serve run --name placesnet serving.app:build_app"',
        'SERVE = "serve run serving.app:build_app"',
        ("tests/test_sweep.py", "-k", "printed_paths"),
        ray=True,
    ),
    M(
        "page: the toggle never shows the overlay",
        "placesnet/serve/static/page.js",
        "      preview.src = overlay.url;\n",
        "",
        ("tests/test_web_page.py", "-k", "toggle"),
        ray=True,
    ),
    M(
        "page: the toggle never brings the photo back",
        "placesnet/serve/static/page.js",
        "if (photo) preview.src = photo;",
        "if (photo) preview.src = overlay.url;",
        ("tests/test_web_page.py", "-k", "toggle"),
        ray=True,
    ),
    M(
        "page: the overlay asked for at every press",
        "placesnet/serve/static/page.js",
        "    if (overlay === null) {",
        "    if (true) {",
        ("tests/test_web_page.py", "-k", "toggle"),
        ray=True,
    ),
    M(
        "page: the overlay's class not named",
        "placesnet/serve/static/page.js",
        "where the model sees ${explained.label}",
        "where the model sees class ${explained.class_index}",
        ("tests/test_web_page.py", "-k", "toggle"),
        ray=True,
    ),
]


def run_one(m: Mutation, python: str, keep: bool) -> tuple[str, float, str]:
    start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="mutate-"))
    try:
        clone = tmp / "repo"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        path = clone / m.file
        text = path.read_text()
        if text.count(m.old) != 1:
            return "does not apply", time.monotonic() - start, f"{m.old!r} occurs {text.count(m.old)} times"
        path.write_text(text.replace(m.old, m.new))
        # The venv's editable install points at the main checkout: PYTHONPATH puts the clone's
        # (mutated) packages first, in pytest, the scripts it runs and Ray's workers alike.
        pythonpath = os.pathsep.join([str(clone), *filter(None, [os.environ.get("PYTHONPATH")])])
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": pythonpath}
        proc = subprocess.run(
            [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
        )
        last = (proc.stdout.strip().splitlines() or [""])[-1]
        if proc.returncode == 1:
            return "caught", time.monotonic() - start, last
        if proc.returncode == 0:
            return "SURVIVED", time.monotonic() - start, last
        return "error", time.monotonic() - start, f"pytest exit {proc.returncode}: {last}"
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-k", dest="match", default="", help="only mutations whose name contains this")
    p.add_argument("--fast", action="store_true", help="skip mutations guarded by Ray tests")
    p.add_argument("--list", action="store_true", help="print the mutations and exit")
    p.add_argument("--keep", action="store_true", help="keep the mutated clones (for debugging)")
    p.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=2,
        help="mutations run at once, each in its own clone (default 2: a Ray test keeps "
        "2 cores only ~60%% busy, so two at a time finish sooner)",
    )
    args = p.parse_args()
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    chosen = [m for m in MUTATIONS if args.match in m.name and not (args.fast and m.ray)]
    if args.list:
        for m in chosen:
            print(f"{m.name:50s} {m.file:28s} {' '.join(m.tests)}{'  [ray]' if m.ray else ''}")
        return 0
    if subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip():
        print("note: uncommitted changes are not in the clones (they are of HEAD)", file=sys.stderr)
    results = []
    print("| mutation | file | result | seconds | tests say |\n|---|---|---|---|---|", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:  # rows print as mutations finish
        running = {pool.submit(run_one, m, sys.executable, args.keep): m for m in chosen}
        for done in as_completed(running):
            m, (verdict, seconds, detail) = running[done], done.result()
            results.append(verdict)
            print(f"| {m.name} | {m.file} | {verdict} | {seconds:.0f} | {detail[:90]} |", flush=True)
    caught = results.count("caught")
    print(
        f"\nscore: {caught}/{len(results)} caught"
        + "".join(
            f", {results.count(v)} {v}" for v in ("SURVIVED", "does not apply", "error") if results.count(v)
        )
    )
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
