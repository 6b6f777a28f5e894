"""The one TGANv2 training loop shared by ``train_movingmnist.py`` and ``train_ucf101.py``.

A train script supplies its defaults, a function that opens its dataset and its ``genSamples``;
everything else (flags, the SPEC §5 update, logging, samples, checkpoints, resume) lives here.
"""

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets import ResumableBatchSampler, real_pyramid, to_unit_range
from models import (PRESETS, ModelConfig, build_models, convert_sync_batchnorm, count_parameters, level_labels,
                    load_weights, model_config)
from utils import (CheckpointError, InputError, OneLineArgumentParser, all_reduce_mean_, append_jsonl,
                   average_gradients, broadcast_module, describe_os_error, discriminator_loss, generator_loss,
                   get_rng_state, init_distributed, last_good_checkpoint, load_checkpoint, nonfinite_entries,
                   prepare_output_folder, previous_checkpoint_path, r1_penalty, resolve_amp, save_checkpoint,
                   seed_everything, set_rng_state, temporary_checkpoint_path, write_json)

# Flags that define the experiment: on --resume they come from the checkpoint, not the command line.
EXPERIMENT_KEYS = ("preset", "n_frames", "batch_size", "lr_g", "lr_d", "beta1", "beta2", "gp_weight",
                   "subsample_frames", "subsample_batch", "lr_decay_start", "seed", "resolution", "dataset", "fold",
                   "split", "sync_bn")


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite."""


def int_list(text: str) -> List[int]:
    """``"2,2,2"`` -> ``[2, 2, 2]`` (argparse type)."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 2,2,2, got {text!r}") from None


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def adam_beta(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
    return value


# Defaults every script shares: the paper's optimisation (SPEC §5) and run-time settings.
# The scripts set the rest (preset, data, iterations, batch, strides, schedule, intervals).
SHARED_DEFAULTS = dict(n_frames=16, lr_g=1e-4, lr_d=1e-4, beta1=0.0, beta2=0.9, gp_weight=0.5,
                       log_every=10, seed=0, device="auto", amp="auto", compile=False, channels_last=True,
                       conditional=False, sync_bn=False, eval_every=0, eval_samples=2048)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the scripts' example lines as written and shows every flag's default."""


def build_parser(description: str, defaults: Dict) -> argparse.ArgumentParser:
    """The flags both train scripts share, with the script's ``defaults`` applied."""
    p = OneLineArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="network sizes (SPEC §2 table)")
    p.add_argument("--data", help="where the training videos come from (see the script's description)")
    p.add_argument("--out", help="run folder: config.json, metrics.jsonl, samples/, checkpoint.pt")
    p.add_argument("--iterations", type=positive_int, help="total training iterations (one G and one D update each)")
    p.add_argument("--batch-size", type=positive_int, help="clips per iteration (per process under torchrun)")
    p.add_argument("--n-frames", type=positive_int, help="frames per training clip (T)")
    p.add_argument("--lr-g", type=positive_float, help="Adam learning rate of the generator")
    p.add_argument("--lr-d", type=positive_float, help="Adam learning rate of the discriminators")
    p.add_argument("--beta1", type=adam_beta, help="Adam beta1 for both networks")
    p.add_argument("--beta2", type=adam_beta, help="Adam beta2 for both networks")
    p.add_argument("--gp-weight", type=non_negative_float,
                   help="weight of the zero-centred R1 penalty on real data (lambda)")
    p.add_argument("--lr-decay-start", type=int,
                   help="iteration from which both learning rates decay linearly to 0 at --iterations; -1 = constant")
    p.add_argument("--subsample-frames", type=int_list,
                   help="frame stride between consecutive levels, comma-separated (one per transition)")
    p.add_argument("--subsample-batch", type=int_list,
                   help="batch stride between consecutive levels, comma-separated (1 = keep every sample)")
    p.add_argument("--sample-every", type=positive_int, help="write a GIF sample grid every N iterations")
    p.add_argument("--checkpoint-every", type=positive_int, help="write OUT/checkpoint.pt every N iterations")
    p.add_argument("--log-every", type=positive_int,
                   help="update the progress bar and metrics.jsonl every N iterations (the only host sync)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue a run: from CKPT, or OUT/checkpoint.pt when given without a value")
    p.add_argument("--seed", type=int, help="seed of weights, latents, subsampling offsets and data order")
    p.add_argument("--device", help="auto (CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--amp", choices=["auto", "none", "bf16"],
                   help="bf16 autocast for the networks (losses and R1 stay fp32); auto = bf16 on GPUs that support "
                        "it and on CPUs with AVX512-BF16/AMX, else none")
    p.add_argument("--workers", type=non_negative_int, help="DataLoader worker processes (0 = load in the main process)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile G and the fake-data pass of D (R1's double backward stays eager)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="channels-last memory layout for the 2-D generator and the 3-D discriminators")
    p.add_argument("--eval-every", type=non_negative_int,
                   help="every N iterations add IS (with --c3d-weights/--c3d-mean) and FVD (with --i3d/--i3d-stats) "
                        "to metrics.jsonl; 0 = never")
    p.add_argument("--eval-samples", type=positive_int, help="generated videos per evaluation (the protocol: 2048)")
    p.add_argument("--c3d-weights", metavar="NPZ", help="the authors' conv3d_deepnetA_ucf.npz (for IS)")
    p.add_argument("--c3d-mean", metavar="NPZ", help="the authors' mean2.npz (for IS)")
    p.add_argument("--i3d", metavar="PT", help="TorchScript I3D (for FVD)")
    p.add_argument("--i3d-stats", metavar="NPZ",
                   help="real-data I3D statistics for FVD, as cached by `evaluate.py fvd --real-videos DIR`")
    p.add_argument("--conditional", action="store_true",
                   help="class-conditional TGANv2: categorical BatchNorm in G, a projection term in every D "
                        "(needs a labelled dataset)")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun, compute the generator's BatchNorm statistics over all processes")
    p.add_argument("--sample-grid", type=positive_int,
                   help="samples are an N x N grid of videos from a fixed latent batch")
    p.set_defaults(**SHARED_DEFAULTS)
    p.set_defaults(**defaults)
    return p


def linear_decay(base_lr: float, iteration: int, start: int, total: int) -> float:
    """Learning rate at ``iteration``: constant before ``start``, then linear to 0 at ``total``."""
    if start < 0 or iteration < start:
        return base_lr
    return base_lr * max(0.0, 1.0 - (iteration - start) / max(1, total - start))


class Trainer:
    """Holds the networks, optimizers and the SPEC §5 update.

    ``step(x_real)`` runs one iteration on real clips ``(N, C, T, H, W)`` and returns the losses as
    0-dim device tensors (no host sync).  Under torchrun, gradients are averaged across processes
    after each backward; each process's R1 term is a sum over its own batch (see the README).
    """

    def __init__(self, cfg: ModelConfig, args, device: torch.device):
        self.cfg, self.args, self.device = cfg, args, device
        gen, dis = build_models(cfg)
        if getattr(args, "sync_bn", False):
            convert_sync_batchnorm(gen)
        self.channels_last = getattr(args, "channels_last", False)
        if self.channels_last:
            gen, dis = gen.to(memory_format=torch.channels_last), dis.to(memory_format=torch.channels_last_3d)
        self.gen, self.dis = gen.to(device), dis.to(device)
        # Compiled graphs do not support the double backward of R1, so D runs eagerly on real data.
        compile_ = getattr(args, "compile", False)
        self.gen_forward = torch.compile(self.gen) if compile_ else self.gen
        self.dis_fake = torch.compile(self.dis) if compile_ else self.dis
        adam = dict(betas=(args.beta1, args.beta2), eps=1e-8)
        if device.type == "cuda":
            adam["fused"] = True  # one kernel for all parameters
            torch.backends.cudnn.benchmark = True  # fixed shapes: autotune every convolution once
        self.opt_g = torch.optim.Adam(self.gen.parameters(), lr=args.lr_g, **adam)
        self.opt_d = torch.optim.Adam(self.dis.parameters(), lr=args.lr_d, **adam)
        self.dis_params = list(self.dis.parameters())
        self.amp = resolve_amp(args.amp, device)
        bf16 = self.amp == "bf16"
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext

    def set_lr(self, iteration: int) -> None:
        a = self.args
        for opt, base in ((self.opt_g, a.lr_g), (self.opt_d, a.lr_d)):
            for group in opt.param_groups:
                group["lr"] = linear_decay(base, iteration, a.lr_decay_start, a.iterations)

    def step(self, x_real: torch.Tensor, labels: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
             fake_labels: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """One G update and one D update.

        ``labels`` ``(N,)`` are the real clips' classes (conditional models only); ``z`` and
        ``fake_labels`` default to fresh ``U(-1, 1)`` latents and uniformly drawn classes.
        """
        cfg = self.cfg
        if (labels is not None) != bool(cfg.n_classes):
            raise ValueError("labels are needed by a conditional model and only by one")
        if self.channels_last:
            x_real = x_real.contiguous(memory_format=torch.channels_last_3d)
        real = real_pyramid(x_real, cfg.subsample_frames, cfg.subsample_batch)
        real = [x.detach().requires_grad_(True) for x in real]
        real_labels = level_labels(labels, cfg.subsample_batch)
        z = self.gen.sample_z(x_real.shape[0]) if z is None else z
        if fake_labels is None:
            fake_labels = self.gen.sample_labels(x_real.shape[0])
        with self.autocast():
            y_real = self.dis(real, real_labels)
            fake = self.gen_forward(z, labels=fake_labels)
            # D sees a detached copy so the generator graph can be freed right after its backward.
            fake_in = [x.detach().requires_grad_(True) for x in fake]
            y_fake = self.dis_fake(fake_in, level_labels(fake_labels, cfg.subsample_batch))

        # 1. generator: gradient of L_G w.r.t. the renders, then through G only (D's grads discarded).
        loss_g = generator_loss(y_fake)
        grad_fake = torch.autograd.grad(loss_g, fake_in, retain_graph=True)
        self.opt_g.zero_grad(set_to_none=True)
        torch.autograd.backward(fake, grad_fake)
        average_gradients(self.gen)
        self.opt_g.step()

        # 2. discriminator on the same forward passes, plus R1 on the real pyramid.
        loss_adv = discriminator_loss(y_real, y_fake)
        r1 = r1_penalty(y_real, real)
        loss_d = loss_adv + self.args.gp_weight * r1
        self.opt_d.zero_grad(set_to_none=True)
        torch.autograd.backward(loss_d, inputs=self.dis_params)
        average_gradients(self.dis)
        self.opt_d.step()
        return {"loss_g": loss_g.detach(), "loss_d": loss_adv.detach(), "r1": r1.detach()}

    def state_dict(self) -> dict:
        return {"generator": self.gen.state_dict(), "discriminator": self.dis.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        load_weights(self.gen, state["generator"], "generator")
        load_weights(self.dis, state["discriminator"], "discriminator")
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])


def any_rank(flag: bool, world_size: int, device) -> bool:
    """Whether ``flag`` is true on any process (a collective call when ``world_size > 1``)."""
    if world_size == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    all_reduce_mean_([value])
    return bool(value.item() > 0)


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag so the loop can finish its step, checkpoint and exit 0.

    Python runs signal handlers only between bytecodes, so a long torch op would delay them for
    minutes.  A watcher thread therefore reads every signal from the interpreter's wakeup fd as it
    arrives: a second one, ``REPEAT_AFTER_S`` or more after the first, ends the process at once
    (exit 128 + signal number).  Saves are atomic, so that never leaves a partial checkpoint.
    Closer repeats are the same request delivered twice (a terminal's Ctrl-C reaches torchrun and
    its workers, and torchrun forwards it again), not a second request.
    """

    REPEAT_AFTER_S = 1.0
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, on_second: str = "the last checkpoint written is intact; continue with --resume"):
        self.signal_name: Optional[str] = None
        self.on_second = on_second

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        self._read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._write_fd = write_fd
        self._old_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="stop-request", daemon=True).start()
        return self

    def _handle(self, signum, frame):
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def _watch(self) -> None:
        try:
            self._count_signals()
        finally:
            os.close(self._read_fd)

    def _count_signals(self) -> None:
        first = None
        while True:
            try:
                data = os.read(self._read_fd, 64)
            except OSError:
                return
            if not data:  # the context was left
                return
            for signum in data:
                if signum not in self.SIGNALS:
                    continue
                now = time.monotonic()
                if first is None:
                    first = now
                elif now - first >= self.REPEAT_AFTER_S:
                    name = signal.Signals(signum).name
                    os.write(2, f"\n{name} again: stopping at once, without a new checkpoint; {self.on_second}\n"
                             .encode())
                    os._exit(128 + signum)

    def agreed(self, world_size: int, device) -> bool:
        """Whether any process was signalled (a collective call when ``world_size > 1``)."""
        return any_rank(self.signal_name is not None, world_size, device)

    def __exit__(self, *exc):
        signal.set_wakeup_fd(self._old_wakeup)
        os.close(self._write_fd)  # the watcher reads end-of-file and returns
        for s, handler in self._old.items():
            signal.signal(s, handler)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C reaches the whole process group, but only the main process
    should react (finish the step, checkpoint); workers exit on their own when it does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def resolve_resume(args) -> Optional[dict]:
    """Load the checkpoint named by ``--resume`` and put its experiment settings into ``args``."""
    if args.resume is None:
        return None
    path = Path(args.out) / "checkpoint.pt" if args.resume == "auto" else Path(args.resume)
    if path.is_dir():
        raise InputError(f"--resume {path}: a folder; expected a checkpoint file such as {path / 'checkpoint.pt'}")
    if not any(p.exists() for p in (path, previous_checkpoint_path(path), temporary_checkpoint_path(path))):
        raise FileNotFoundError(f"--resume: checkpoint {path} not found")
    try:
        ckpt = load_checkpoint(path, repair=True)  # never resumes from a non-finite or unreadable file
    except CheckpointError as err:
        raise CheckpointError(f"--resume: {err}") from None
    saved = ckpt["config"]
    if bool(saved.get("conditional")) != bool(getattr(args, "conditional", False)):
        held = (f"a conditional model ({saved['model']['n_classes']} classes)" if saved.get("conditional")
                else "an unconditional model")
        raise ValueError(f"--resume: {path} holds {held}; "
                         f"{'pass' if saved.get('conditional') else 'drop'} --conditional to continue it")
    for key in EXPERIMENT_KEYS:
        if key in saved and getattr(args, key, None) != saved[key]:
            print(f"--resume: using {key}={saved[key]!r} from the checkpoint", file=sys.stderr)
            setattr(args, key, saved[key])
    return ckpt


def check_clip_geometry(args) -> None:
    """Every level must keep at least one frame and one clip: ``--n-frames`` >= the product of
    ``--subsample-frames`` and ``--batch-size`` >= the product of ``--subsample-batch``."""
    for flag, value, strides_flag, strides in (("--n-frames", args.n_frames, "--subsample-frames", args.subsample_frames),
                                               ("--batch-size", args.batch_size, "--subsample-batch", args.subsample_batch)):
        needed = math.prod(strides)
        if value < needed:
            raise InputError(f"{flag} {value}: {strides_flag} {','.join(map(str, strides))} leaves "
                             f"{value // needed} at the last level; expected at least {needed}")


def load_eval_models(args, device):
    """The evaluation networks ``--eval-every`` needs, or ``None`` when evaluation is off."""
    if not getattr(args, "eval_every", 0):
        return None
    from evaluate import EvalModels, load_c3d, load_i3d, load_statistics

    if bool(args.c3d_weights) != bool(args.c3d_mean) or bool(args.i3d) != bool(args.i3d_stats):
        raise ValueError("--eval-every: give --c3d-weights with --c3d-mean, and --i3d with --i3d-stats")
    if not (args.c3d_weights or args.i3d):
        raise ValueError("--eval-every needs --c3d-weights/--c3d-mean (IS) or --i3d/--i3d-stats (FVD)")
    return EvalModels(c3d=load_c3d(args.c3d_weights, args.c3d_mean, device) if args.c3d_weights else None,
                      i3d=load_i3d(args.i3d, device) if args.i3d else None,
                      i3d_stats=load_statistics(args.i3d_stats, "i3d") if args.i3d_stats else None)


def gather_rng_states(world_size: int) -> list:
    """Every process's RNG state, in rank order (collective when ``world_size > 1``)."""
    state = get_rng_state()
    if world_size == 1:
        return [state]
    import torch.distributed as dist

    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def train(args, dataset, gen_samples: Callable, describe_data: str = "", ckpt: Optional[dict] = None) -> dict:
    """Run the SPEC §5 loop on ``dataset`` (uint8 clips ``(C, T, H, W)`` keyed by ``(index, seed)``).

    ``ckpt`` is the checkpoint to continue from (see :func:`resolve_resume`).  Writes
    ``OUT/config.json``, ``OUT/metrics.jsonl``, ``OUT/samples/`` (through ``gen_samples``) and
    ``OUT/checkpoint.pt`` — on rank 0 only under torchrun.  Returns the last logged metrics.
    """
    out = Path(args.out)
    rank, world_size, device = init_distributed(args.device)
    is_main = rank == 0
    seed_everything(args.seed)  # identical initial weights on every rank
    conditional = getattr(args, "conditional", False)
    classes = list(getattr(dataset, "classes", None) or [])
    if conditional and not classes:
        source = describe_data or type(dataset).__name__
        raise ValueError(f"--conditional needs a labelled dataset; {source} has no classes")
    cfg = model_config(args.preset, resolution=getattr(args, "resolution", None), n_frames=args.n_frames,
                       subsample_frames=args.subsample_frames, subsample_batch=args.subsample_batch,
                       n_classes=len(classes) if conditional else 0)
    trainer = Trainer(cfg, args, device)
    broadcast_module(trainer.gen)
    broadcast_module(trainer.dis)
    seed_everything(args.seed + 1_000_003 * rank)  # but different latents and offsets per rank
    start = 0
    if ckpt is not None:
        trainer.load_state_dict(ckpt)
        start = int(ckpt["iteration"])
        states = ckpt["rng"]
        if len(states) == world_size:
            set_rng_state(states[rank])
        else:
            print(f"--resume: checkpoint written by {len(states)} processes, now {world_size}; "
                  "latent and offset streams are reseeded (data order is kept)", file=sys.stderr)
            seed_everything(args.seed + 1_000_003 * rank + start)
        del ckpt
    config = {k: v for k, v in vars(args).items()}
    config.update(model=cfg.to_dict(), classes=classes if conditional else None, device=str(device),
                  amp=trainer.amp, world_size=world_size, data_description=describe_data,
                  params={"generator": count_parameters(trainer.gen), "discriminator": count_parameters(trainer.dis)},
                  torch_version=str(torch.__version__))
    config = json.loads(json.dumps(config))  # plain values only: checkpoints load with weights_only=True
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", config)

    sampler = ResumableBatchSampler(len(dataset), args.batch_size, args.seed, start_iteration=start,
                                    rank=rank, world_size=world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers,
                        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
                        worker_init_fn=ignore_stop_signals,
                        generator=torch.Generator().manual_seed(args.seed))  # keeps the global RNG untouched
    fixed_z = trainer.gen.sample_z(args.sample_grid**2, device="cpu",
                                   generator=torch.Generator().manual_seed(args.seed)).to(device)
    # Conditional samples: one row per class, rows spread evenly over the class list.
    fixed_labels = None
    if conditional:
        row_classes = torch.linspace(0, len(classes) - 1, args.sample_grid).round().long()
        fixed_labels = row_classes.repeat_interleave(args.sample_grid).to(device)

    def save(iteration: int) -> None:
        rng = gather_rng_states(world_size)  # collective: every rank takes part
        state = trainer.state_dict()
        bad = nonfinite_entries(state)  # on every rank, so that all of them stop together
        if any_rank(bool(bad), world_size, device):
            found = f"values in {', '.join(bad)}" if bad else "values on another rank"
            raise TrainingDiverged(f"non-finite {found} at iteration {iteration}; stopped without saving. "
                                   + (last_good_checkpoint(out / "checkpoint.pt") if is_main else ""))
        if is_main:
            state.update(iteration=iteration, config=config, rng=rng)
            save_checkpoint(state, out / "checkpoint.pt")

    eval_models = load_eval_models(args, device) if is_main else None

    def evaluate(iteration: int) -> None:
        from evaluate import evaluate_generator

        scores = evaluate_generator(trainer.gen, eval_models, n_samples=args.eval_samples, n_frames=cfg.n_frames,
                                    seed=args.seed)
        record = {"iteration": iteration, **{k: v for k, v in scores.items() if not k.endswith("_runs")}}
        append_jsonl(out / "metrics.jsonl", record)
        tqdm.write(f"iteration {iteration}: " + ", ".join(f"{k} {record[k]:.3f}" for k in ("IS", "FVD", "accuracy")
                                                          if k in record))

    def sample(iteration: int) -> None:
        if not is_main:
            return
        trainer.gen.eval()
        with torch.no_grad(), trainer.autocast():
            gen_samples(trainer.gen, fixed_z, iteration, out, fixed_labels)
        trainer.gen.train()

    sums = torch.zeros(3, device=device)  # running L_G, L_D, R1 since the last log
    last: dict = {}
    count, t_log = 0, time.perf_counter()

    def flush(iteration: int) -> dict:
        nonlocal count, t_log
        all_reduce_mean_([sums])
        values = dict(zip(("loss_g", "loss_d", "r1"), (sums / max(count, 1)).tolist()))
        if not all(math.isfinite(v) for v in values.values()):
            raise TrainingDiverged(
                f"non-finite loss at iteration {iteration} ({', '.join(f'{k}={v}' for k, v in values.items())}); "
                "stopped without saving. " + (last_good_checkpoint(out / "checkpoint.pt") if is_main else "")
            )
        now = time.perf_counter()
        record = {"iteration": iteration, **values, "lr_g": trainer.opt_g.param_groups[0]["lr"],
                  "lr_d": trainer.opt_d.param_groups[0]["lr"], "it_per_s": count / max(now - t_log, 1e-9)}
        if is_main:
            append_jsonl(out / "metrics.jsonl", record)
        sums.zero_()
        count, t_log = 0, now
        return record

    bar = tqdm(total=args.iterations, initial=start, dynamic_ncols=True, desc=out.name, disable=not is_main)
    data_iter = iter(loader)
    iteration = start
    with StopRequest(f"{out / 'checkpoint.pt'} is intact; continue with --resume") as stop:
        while iteration < args.iterations:
            batch = next(data_iter)
            x_real, labels = (batch[0], batch[1].to(device, non_blocking=True)) if conditional else (batch, None)
            x_real = to_unit_range(x_real.to(device, non_blocking=True))  # uint8 until here: 4x less traffic
            trainer.set_lr(iteration)
            losses = trainer.step(x_real, labels)
            iteration += 1
            sums += torch.stack([losses["loss_g"], losses["loss_d"], losses["r1"]])
            count += 1
            bar.update(1)
            log_now = iteration % args.log_every == 0 or iteration == args.iterations
            # Alone, the flag is read every step; under torchrun the ranks agree at log steps only.
            stopping = stop.agreed(world_size, device) if (log_now or world_size == 1) else False
            if log_now or stopping:
                last = flush(iteration)
                bar.set_postfix(L_G=f"{last['loss_g']:.3f}", L_D=f"{last['loss_d']:.3f}", R1=f"{last['r1']:.3f}")
            t_io = time.perf_counter()
            if iteration % args.sample_every == 0 or iteration == args.iterations:
                sample(iteration)
            if eval_models is not None and (iteration % args.eval_every == 0 or iteration == args.iterations):
                evaluate(iteration)
            if iteration % args.checkpoint_every == 0 or iteration == args.iterations or stopping:
                save(iteration)
            t_log += time.perf_counter() - t_io  # it/s measures training, not sample/checkpoint writing
            if stopping:
                bar.close()
                if is_main:
                    print(f"{stop.signal_name or 'signal on another rank'}: stopped after iteration {iteration}; "
                          f"checkpoint written to {out / 'checkpoint.pt'} (continue with --resume)", file=sys.stderr)
                return last
    bar.close()
    return last


def main(description: str, defaults: Dict, open_dataset: Callable, gen_samples: Callable, argv=None,
         add_arguments: Optional[Callable] = None) -> dict:
    """Parse flags, open the dataset with ``open_dataset(args) -> (dataset, description)`` and train.

    ``add_arguments(parser)`` lets a script add its own flags.  Bad input (a missing file, a
    malformed array, a bad flag value) exits with a one-line error.
    """
    parser = build_parser(description, defaults)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        prepare_output_folder(args.out)
        ckpt = resolve_resume(args)  # first: the checkpoint's settings decide how the data is opened
        check_clip_geometry(args)
        dataset, describe = open_dataset(args)
        return train(args, dataset, gen_samples, describe, ckpt)
    except (FileNotFoundError, ValueError, TrainingDiverged, CheckpointError) as err:
        tqdm.write(f"error: {err}", file=sys.stderr)  # on its own line, below the progress bar
        raise SystemExit(1)
    except OSError as err:  # the disk filled up or went read-only mid-run
        tqdm.write(f"error: {describe_os_error(err)}; {last_good_checkpoint(Path(args.out) / 'checkpoint.pt')}",
                   file=sys.stderr)
        raise SystemExit(1)
