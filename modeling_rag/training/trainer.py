"""The Accelerate skeleton ([`Trainer`]): one `prepare`, `accelerator.accumulate`, gradient clipping,
a scheduler stepped once per optimizer step, checkpoints written atomically with `save_state`
(into a temporary folder renamed into place), exact resume with `load_state` +
`skip_first_batches`, trackers through `log_with`, and a JSON-lines log of every optimizer step
(``train_log.jsonl`` in the output folder).

A run that is resumed from a checkpoint reproduces the uninterrupted run: same batches, same random
state, same losses and weights (up to floating-point reduction order).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..constants import CHECKPOINTS_DIR, TRAIN_LOG_NAME, TRAINER_STATE_NAME
from ..errors import RagConfigError
from ..library_output import configure_script_output
from ..utils.atomic import atomic_write_text
from .data import EpochSampler, _identity_collate

logger = logging.getLogger(__name__)


_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainState:
    """What a checkpoint holds besides model, optimizer, scheduler and random states."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    extra: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "extra": self.extra,
        }

    def load_state_dict(self, state: dict) -> None:
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self.extra = dict(state.get("extra") or {})

    def save(self, folder: str) -> None:
        """Writes the state as JSON into a checkpoint folder (atomically)."""
        atomic_write_text(os.path.join(folder, TRAINER_STATE_NAME), json.dumps(_jsonable(self.state_dict())) + "\n")

    def load(self, folder: str) -> None:
        """Reads the state a checkpoint folder holds, checking every field (no pickle involved)."""
        path = os.path.join(folder, TRAINER_STATE_NAME)
        try:
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
        except FileNotFoundError:
            raise RagConfigError(
                f"{folder} has no {TRAINER_STATE_NAME}: it is not a complete checkpoint of these training scripts. "
                "Resume from a checkpoints/step_N folder they wrote, or start afresh."
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RagConfigError(f"{path} is not valid JSON ({err}); the checkpoint is damaged.") from None
        ok = isinstance(state, dict) and isinstance(state.get("extra", {}), dict)
        ok = ok and all(
            isinstance(state.get(k), int) and not isinstance(state.get(k), bool) and state[k] >= 0
            for k in ("global_step", "epoch", "batches_in_epoch")
        )
        if not ok:
            raise RagConfigError(
                f"{path} must hold non-negative integers global_step, epoch, batches_in_epoch and an object extra; "
                "the checkpoint is damaged."
            )
        self.load_state_dict(state)


try:  # accelerate's tracker base class, for a dependency-free JSON-lines tracker
    from accelerate.tracking import GeneralTracker, on_main_process
except ImportError:  # pragma: no cover
    GeneralTracker = object  # type: ignore[misc,assignment]

    def on_main_process(f):  # type: ignore[no-redef]
        return f


class JsonlTracker(GeneralTracker):
    """An Accelerate tracker that appends `{"step": ..., **values}` lines to ``<logging_dir>/<run>.jsonl``."""

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    @on_main_process
    def __init__(self, run_name: str, logging_dir: str | os.PathLike):
        super().__init__()
        self.run_name = run_name
        os.makedirs(logging_dir, exist_ok=True)
        self.path = os.path.join(logging_dir, f"{run_name}.jsonl")

    @property
    def tracker(self):
        return self.path

    @on_main_process
    def store_init_configuration(self, values: dict):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"config": _jsonable(values)}) + "\n")

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **_jsonable(values)}) + "\n")


def _jsonable(values: dict) -> dict:
    out = {}
    for k, v in values.items():
        if isinstance(v, torch.Tensor):
            v = v.item() if v.numel() == 1 else v.tolist()
        elif isinstance(v, (np.floating, np.integer)):
            v = v.item()
        elif not isinstance(v, (str, int, float, bool, type(None), list, dict)):
            v = str(v)
        out[k] = v
    return out


def create_accelerator(args: argparse.Namespace, *, find_unused_parameters: bool = False):
    """The run's `Accelerator`: CPU flag, mixed precision (checked against the hardware), accumulation,
    trackers (``--with-tracking`` / ``--report-to``) and the project folder."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    mixed = args.mixed_precision
    cpu = bool(args.cpu)
    if not cpu and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # launched as several processes (torchrun / accelerate launch --multi_gpu) on a machine without
        # GPUs: without cpu=True accelerate would not join the processes; use gloo on the CPU
        cpu = True
    on_gpu = torch.cuda.is_available() and not cpu
    if mixed == "fp16" and not on_gpu:
        logger.warning("--mixed-precision fp16 needs a GPU; training in full precision instead.")
        mixed = "no"
    log_with = None
    if args.with_tracking:
        names = [n.strip() for n in str(args.report_to).split(",") if n.strip()]
        log_with = []
        for n in names:
            if n == "jsonl":
                log_with.append(JsonlTracker(args.project_name, os.path.join(args.output_dir, "tracking")))
            else:
                log_with.append(n)
    kwargs_handlers = [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)]
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=args.output_dir, automatic_checkpoint_naming=False),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=kwargs_handlers,
    )
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    return accelerator


def _checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS_DIR)


def list_checkpoints(output_dir: str) -> list[str]:
    """Finished checkpoints (``step_N`` folders) in `output_dir`, oldest first."""
    root = _checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return [p for _, p in sorted(found)]


def save_checkpoint(
    accelerator, output_dir: str, step: int, total_limit: int | None = None, state: TrainState | None = None
) -> str:
    """`save_state` (plus `state` as JSON) into a temporary folder, then rename it to ``checkpoints/step_<step>``.

    A run killed while saving leaves only a ``.tmp-step_<step>`` folder, which resume ignores.
    Every process must call this (each saves its own random state).
    """
    root = _checkpoint_root(output_dir)
    final = os.path.join(root, f"step_{step}")
    tmp = os.path.join(root, f".tmp-step_{step}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp, safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if state is not None:
            state.save(tmp)
        if os.path.isdir(final):
            _discard(final)
        os.replace(tmp, final)
        if total_limit is not None and total_limit > 0:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                _discard(old)
    accelerator.wait_for_everyone()
    return final


def _discard(folder: str) -> None:
    """Removes a checkpoint folder: renamed out of the ``step_*`` names first (atomic), then deleted, so a
    run killed while deleting never leaves a half-deleted folder that resume would take for a checkpoint."""
    hidden = os.path.join(os.path.dirname(folder), f".old-{os.path.basename(folder)}")
    shutil.rmtree(hidden, ignore_errors=True)
    os.replace(folder, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def resolve_checkpoint(spec: str | None, output_dir: str) -> str | None:
    """The checkpoint folder named by ``--resume-from-checkpoint`` (`'latest'` = newest or None)."""
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    if not os.path.isdir(spec):
        raise RagConfigError(f"--resume-from-checkpoint: {spec} is not a checkpoint folder.")
    return spec


def _optimizer(params, args, learning_rate_for: Callable[[str], float] | None = None) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only; `learning_rate_for(name)` may give parameters their own rate."""
    groups: dict[tuple[bool, float], list] = {}
    for name, p in params:
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")
        lr = float(learning_rate_for(name)) if learning_rate_for is not None else float(args.learning_rate)
        groups.setdefault((no_decay, lr), []).append(p)
    if not groups:
        raise RagConfigError("Nothing to train: every parameter is frozen.")
    return torch.optim.AdamW(
        [
            {"params": ps, "weight_decay": 0.0 if no_decay else args.weight_decay, "lr": lr}
            for (no_decay, lr), ps in sorted(groups.items())
        ],
        lr=args.learning_rate,
    )


class Trainer:
    """The Accelerate training loop shared by the scripts.

    The script gives `train_step(examples) -> loss` (the loss already back-propagated through
    `accelerator.backward`, detached); the trainer owns data order, accumulation, clipping, optimizer and
    scheduler steps, logging, evaluation, checkpoints and resume.

    Args:
        accelerator: From [`create_accelerator`].
        args: The parsed options (see [`add_common_training_args`]).
        module: The `nn.Module` holding the trainable parameters (prepared here, once).
        num_examples: Training questions; batches are lists of their indices.
        train_step: Called inside `accelerator.accumulate(module)` with the list of example indices.
        evaluate: Optional `() -> dict` of validation metrics (called on every process).
        on_epoch_start: Optional `(epoch, state) -> None`, e.g. hard-negative mining; it may store what
            must survive a resume in `state.extra` (checkpointed).
        named_parameters: The `(name, parameter)` pairs to optimise (default: the module's trainable ones).
        learning_rate_for: Optional `(parameter name) -> learning rate`, for parameters that train at
            their own rate (default: `args.learning_rate` for all); the schedule scales every rate alike.
        on_step_end: Optional `(state) -> None` called on every process after each optimizer step (e.g.
            re-encoding the index), before logging and checkpointing.
    """

    def __init__(
        self,
        accelerator,
        args: argparse.Namespace,
        module: torch.nn.Module,
        num_examples: int,
        train_step: Callable[[list[int]], torch.Tensor],
        *,
        evaluate: Callable[[], dict] | None = None,
        on_epoch_start: Callable[[int, TrainState], None] | None = None,
        named_parameters: Iterable | None = None,
        on_step_end: Callable[[TrainState], None] | None = None,
        learning_rate_for: Callable[[str], float] | None = None,
    ):
        from transformers import get_scheduler

        self.accelerator = accelerator
        self.args = args
        self.train_step = train_step
        self.evaluate = evaluate
        self.on_epoch_start = on_epoch_start
        self.on_step_end = on_step_end
        self.stopped_early = False
        self.sampler = EpochSampler(num_examples, args.seed)
        loader = DataLoader(
            list(range(num_examples)),
            batch_size=args.batch_size,
            sampler=self.sampler,
            collate_fn=_identity_collate,
            # its own generator: creating an iterator then draws no number from the global torch RNG,
            # which a resumed run restores to the checkpoint's state
            generator=torch.Generator().manual_seed(int(args.seed)),
        )
        optimizer = _optimizer(named_parameters or module.named_parameters(), args, learning_rate_for)
        self.module, self.optimizer, self.dataloader = accelerator.prepare(module, optimizer, loader)
        self.batches_per_epoch = len(self.dataloader)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / args.gradient_accumulation_steps)
        if args.max_train_steps:
            self.max_steps = int(args.max_train_steps)
            self.num_epochs = math.ceil(self.max_steps / self.steps_per_epoch)
        else:
            self.num_epochs = int(args.num_epochs)
            self.max_steps = self.num_epochs * self.steps_per_epoch
        scheduler = get_scheduler(
            args.lr_scheduler,
            self.optimizer.optimizer,
            num_warmup_steps=int(args.warmup_ratio * self.max_steps),
            num_training_steps=self.max_steps,
        )
        self.scheduler = accelerator.prepare(scheduler)
        # the step counters go into each checkpoint as JSON (TrainState.save), not through
        # register_for_checkpointing, whose custom_checkpoint_*.pkl accelerate unpickles without restriction
        self.state = TrainState()
        self.log_path = os.path.join(args.output_dir, TRAIN_LOG_NAME)
        self.history: list[dict] = []
        self.checkpoint_every = None
        self.checkpoint_epochs = False
        if args.checkpointing_steps is not None:
            spec = str(args.checkpointing_steps)
            if spec == "epoch":
                self.checkpoint_epochs = True
            elif spec.isdigit() and int(spec) > 0:
                self.checkpoint_every = int(spec)
            else:
                raise RagConfigError(f"--checkpointing-steps must be a positive integer or 'epoch', got {spec!r}.")
        if args.with_tracking:
            accelerator.init_trackers(args.project_name, config=_jsonable(vars(args)))
        fresh = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir) is None
        if fresh and accelerator.is_main_process and os.path.exists(self.log_path):
            os.remove(self.log_path)  # a new run starts a new log
        accelerator.wait_for_everyone()

    # ------------------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.accelerator.is_main_process:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(_jsonable(record)) + "\n")
        if self.args.with_tracking:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record.get("step"))

    def _checkpoint(self) -> None:
        save_checkpoint(
            self.accelerator,
            self.args.output_dir,
            self.state.global_step,
            self.args.checkpoints_total_limit,
            state=self.state,
        )

    def evaluate_before_training(self) -> dict | None:
        """Runs `evaluate` once before the first step of a fresh run and logs it as step 0.

        Returns the metrics, or None when there is no `evaluate` or the run resumes from a checkpoint.
        """
        if self.evaluate is None or self.args.resume_from_checkpoint:
            return None
        metrics = self.evaluate()
        if not metrics:
            return None
        self._log({"step": 0, "epoch": 0, **{f"eval_{k}": v for k, v in metrics.items()}})
        self.accelerator.print(f"Before training: {metrics}")
        return metrics

    def _run_eval(self) -> None:
        if self.evaluate is None:
            return
        metrics = self.evaluate()
        if metrics:
            record = {"step": self.state.global_step, "epoch": self.state.epoch}
            record.update({f"eval_{k}": v for k, v in metrics.items()})
            self._log(record)
            if self.accelerator.is_main_process:
                logger.info("step %d eval %s", self.state.global_step, metrics)

    def resume(self) -> bool:
        """Loads ``--resume-from-checkpoint`` if given; returns whether a checkpoint was loaded."""
        path = resolve_checkpoint(self.args.resume_from_checkpoint, self.args.output_dir)
        if path is None:
            return False
        self.accelerator.print(f"Resuming from {path}")
        self.state.load(path)  # first: a folder that is not our checkpoint is refused before loading anything
        self.accelerator.load_state(path)
        if self.accelerator.is_main_process and os.path.exists(self.log_path):
            # drop log lines written after the checkpoint by the interrupted run (and a line cut by a kill)
            kept = []
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(record, dict) and record.get("step", 0) <= self.state.global_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
            atomic_write_text(self.log_path, "".join(kept))
        return True

    def _current_learning_rate(self) -> float:
        """`--learning-rate` as the schedule has scaled it now (groups with their own rate scale alike)."""
        group = self.optimizer.param_groups[0]
        return self.scheduler.get_last_lr()[0] * float(self.args.learning_rate) / float(group["initial_lr"])

    def train(self) -> list[dict]:
        """Runs (or resumes) the training loop; returns this invocation's log records."""
        acc, args, state = self.accelerator, self.args, self.state
        self.resume()
        start_epoch = state.epoch
        skip = state.batches_in_epoch
        if skip >= self.batches_per_epoch:
            start_epoch, skip = start_epoch + 1, 0
        steps_this_run = 0
        t0 = time.time()
        self.module.train()
        done = state.global_step >= self.max_steps
        for epoch in range(start_epoch, self.num_epochs):
            if done:
                break
            state.epoch = epoch
            self.sampler.set_epoch(epoch)
            resuming_mid_epoch = epoch == start_epoch and skip > 0
            if self.on_epoch_start is not None and not resuming_mid_epoch:
                self.on_epoch_start(epoch, state)
                self.module.train()
            loader = acc.skip_first_batches(self.dataloader, skip) if resuming_mid_epoch else self.dataloader
            # accelerate's loaders re-set their sampler's epoch from their own counter when iterated
            loader.set_epoch(epoch)
            state.batches_in_epoch = skip if resuming_mid_epoch else 0
            losses: list[torch.Tensor] = []
            for batch in loader:
                with acc.accumulate(self.module):
                    loss = self.train_step(batch)
                    losses.append(loss.detach().float())
                    if acc.sync_gradients:
                        if args.max_grad_norm and args.max_grad_norm > 0:
                            acc.clip_grad_norm_(self.module.parameters(), args.max_grad_norm)
                        self.optimizer.step()
                        self.scheduler.step()
                        self.optimizer.zero_grad(set_to_none=True)
                state.batches_in_epoch += 1
                if not acc.sync_gradients:
                    continue
                state.global_step += 1
                steps_this_run += 1
                if self.on_step_end is not None:
                    self.on_step_end(state)
                    self.module.train()
                step_loss = acc.reduce(torch.stack(losses).mean().to(acc.device), reduction="mean").item()
                losses = []
                if state.global_step % max(args.logging_steps, 1) == 0 or state.global_step == self.max_steps:
                    self._log(
                        {
                            "step": state.global_step,
                            "epoch": epoch,
                            "loss": step_loss,
                            "lr": self._current_learning_rate(),
                            "elapsed_s": round(time.time() - t0, 2),
                        }
                    )
                if args.eval_steps and state.global_step % args.eval_steps == 0:
                    self._run_eval()
                    self.module.train()
                if self.checkpoint_every and state.global_step % self.checkpoint_every == 0:
                    self._checkpoint()
                if state.global_step >= self.max_steps:
                    done = True
                    break
                if args.stop_after_steps and steps_this_run >= args.stop_after_steps:
                    if not (self.checkpoint_every and state.global_step % self.checkpoint_every == 0):
                        self._checkpoint()
                    acc.print(f"Stopping after {steps_this_run} steps (--stop-after-steps); resume to continue.")
                    self.stopped_early = True
                    return self.history
            if not args.eval_steps:
                self._run_eval()
                self.module.train()
            if self.checkpoint_epochs:
                self._checkpoint()
        self.stopped_early = False
        return self.history

    def end(self) -> None:
        """Closes the trackers."""
        if self.args.with_tracking:
            self.accelerator.end_training()


def setup_logging(accelerator, verbose: bool = False) -> None:
    """INFO logging on the main process, warnings elsewhere; the libraries' bars and notices only if `verbose`."""
    import datasets
    import transformers

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("faiss", "faiss.loader", "bm25s", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        datasets.utils.logging.set_verbosity_warning()
        configure_script_output(verbose)
    else:
        logging.getLogger().setLevel(logging.ERROR)
        transformers.utils.logging.set_verbosity_error()
        datasets.utils.logging.set_verbosity_error()


def broadcast_from_main(accelerator, compute: Callable[[], Any]) -> Any:
    """Runs `compute` on the main process only and hands its (picklable) result to every process."""
    if accelerator.num_processes == 1:
        return compute()
    from accelerate.utils import broadcast_object_list

    payload = [compute() if accelerator.is_main_process else None]
    broadcast_object_list(payload, from_process=0)
    return payload[0]
