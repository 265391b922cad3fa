"""Train and evaluate AVMoE / MoLT adapters on audio-visual event localization.

    python train.py                                 MoLT on the synthetic AVE
    python train.py --mode=avmoe --out_dir=out/avmoe    sequential AVMoE adapters in every layer
    python train.py --mode=frozen --out_dir=out/frozen  the same head on frozen features: what the adapters add
    python train.py --modalities=a --out_dir=out/a      audio only (or v)
    python train.py --data=ave --data_root=AVE_Dataset --prepared_dir=prepared --vit_ckpt=... --ast_ckpt=...
    torchrun --nproc_per_node=2 train.py            data parallel (gloo on CPU, nccl on GPU)
    python train.py --bench                         parameters, activation memory and step time: AVMoE vs MoLT
    python train.py --probe                         layer-wise linear probe of the frozen backbones
    python train.py --summary out/s0 out/s1 ...     mean +- std of the runs' metrics.json

Stage 0 pre-trains small backbones (unless --vit_ckpt/--ast_ckpt are given); stage 1 freezes them and trains the
adapters, selects the epoch on val and reports on test. Each run writes to its own --out_dir; the generated data and
stage-0 backbones are cached in --cache_dir and shared by runs.
"""
import base64
import contextlib
import dataclasses
import hashlib
import html
import inspect
import json
import math
import os
import pathlib
import re
import shlex
import struct
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
from model import AST, CHOICES, AVConfig, AVModel, ViT, check_config, load_ast, load_vit, param_counts, timm_state_dict


@dataclasses.dataclass
class Config(AVConfig, data.SynthConfig):
    data: str = "synthetic"  # "synthetic" or "ave" (real AVE, prepared with data.py --prepare_ave)
    data_root: str = ""  # real AVE: the folder with Annotations.txt and the split files
    prepared_dir: str = ""  # real AVE: the output of data.py --prepare_ave
    workers: int = 2  # processes drawing the synthetic set
    vit_ckpt: str = ""  # timm or torchvision ViT weights (.pth, .safetensors); empty: pre-train one in stage 0
    ast_ckpt: str = ""  # AST-repo or Hugging Face AST weights; empty: pre-train one in stage 0
    vit_heads: int = 0  # attention heads of --vit_ckpt; 0: D // 64
    ast_heads: int = 0  # attention heads of --ast_ckpt; 0: D // 64
    fstride: int = 16  # AST patch stride along frequency; 16: no overlap, half the cost (the released AST: 10)
    tstride: int = 16  # AST patch stride along time (the released AudioSet AST: 10, as its weights need)
    dim: int = 64  # stage-0 backbones: width
    depth: int = 4  # stage-0 backbones: layers
    heads: int = 4  # stage-0 backbones: attention heads
    pretrain_samples: int = 4000  # stage-0 training images and sounds
    vit_epochs: int = 14  # stage-0 epochs of the ViT: until it names about 98 % of its training images
    ast_epochs: int = 7  # stage-0 epochs of the AST, which learns faster (the two train at once, a core each)
    epochs: int = 10  # training epochs; the epoch with the best val accuracy is kept
    batch_size: int = 32  # clips of 10 segments per step (per process under torchrun)
    lr: float = 3e-3  # AdamW learning rate
    lr_step: int = 4  # StepLR: lr x 0.35 every lr_step epochs (the official AVE recipe uses 3)
    weight_decay: float = 0.01  # AdamW weight decay
    lambda_orth: float = 0.1  # weight of MoLT's orthogonality loss
    lambda_balance: float = 0.01  # weight of the routers' load-balance loss
    modality_dropout: float = 0.0  # training: remove a segment's audio, or its frames, with this probability each
    cache_features: bool = True  # MoLT / frozen: compute the frozen backbone states once (real AVE: fp16 files)
    out_dir: str = "out"  # this run's checkpoint, log, metrics and report
    cache_dir: str = "out"  # generated data and stage-0 backbones, shared by runs
    resume: bool = False  # continue the run in out_dir from its ckpt.pt
    overwrite: bool = False  # start afresh in an out_dir that holds another run
    device: str = "auto"  # auto (cuda, then mps, then cpu), cuda, mps or cpu
    dist_timeout: int = 600  # torchrun: seconds a process waits for the others before it stops with an error


RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
STREAMS = {"a": "audio", "v": "visual"}
ROLES = {0: "event", 1: "heard only", 2: "seen only", -1: "-"}  # the synthetic generator's runs (data.make_clip)
PRETRAIN_BATCH = 64  # stage-0 samples per step
RUN_FILES = ("ckpt.pt", "log.csv", "metrics.json", "report.html")  # what a run writes in out_dir
LOCKS = {}  # the run folders this process holds: path of run.lock -> its open file


# ----------------------------------------------------------------------------- training and evaluation


def main(cfg):
    t_start, seconds = time.time(), {}
    device = setup(cfg)
    with phase("data", seconds):
        sets, cfg.num_classes = datasets(cfg)
    with phase("stage 0", seconds):
        vit, ast = backbones(cfg)
    torch.manual_seed(cfg.seed)
    model = AVModel(cfg, vit, ast).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if WORLD > 1 else model
    counts = param_counts(model)
    log(f"{cfg.mode} ({cfg.modalities}): trainable {counts['adapters']:,} adapter + {counts['head']:,} head "
        f"parameters of {counts['total']:,} in all")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, cfg.lr_step, gamma=0.35)
    run = start_or_resume(cfg, model, opt, sched, sets)
    for k, v in run["seconds"].items():  # a resumed run's times count the earlier processes too
        seconds[k] = round(seconds.get(k, 0) + v, 1)
    run["seconds"], t_start = seconds, t_start - run["elapsed"]
    caching = cfg.cache_features and cfg.mode != "avmoe"
    with phase("feature cache", seconds):  # only rank 0 evaluates, so only it caches val and test
        caches = {s: data.FeatureCache(model, sets[s], None if cfg.data == "synthetic" else
                                       os.path.join(cfg.out_dir, f"features_rank{RANK}_{s}"), show=RANK == 0)
                  if caching and (s == "train" or RANK == 0) else None for s in sets}
    # With the feature cache, a batch is (clip indices, labels), never frames and fbanks: run_batch then gives the
    # model the cached states of those clips (forward's states=), and the backbones never run again.
    items = {s: torch.utils.data.TensorDataset(torch.arange(len(ds)), torch.stack(list(ds.labels))) if caching else ds
             for s, ds in sets.items()}
    loaders = {s: torch.utils.data.DataLoader(items[s], 2 * cfg.batch_size, generator=torch.Generator())
               for s in ("val", "test")}  # their own RNG: evaluating draws no random number
    for epoch in range(run["epoch"], cfg.epochs):
        t0 = time.time()
        with phase("training", seconds):
            loss = train_epoch(ddp, items["train"], opt, cfg, device, caches["train"], epoch)
        sched.step()
        if RANK == 0:
            with phase("validation", seconds):
                val_acc = evaluate(model, loaders["val"], device, caches["val"])["acc"]
            if val_acc > run["best_val"]:  # model selection on val, never on test
                run["best_val"], run["best"] = val_acc, trainable_state(model)
            run["history"].append({"epoch": epoch + 1, "train_loss": round(loss, 4), "val_acc": round(val_acc, 4),
                                   "seconds": round(time.time() - t0, 2)})
            print(f"\repoch {epoch + 1}/{cfg.epochs}: loss {loss:.3f}  val acc {val_acc:.3f}  "
                  f"{time.time() - t0:.1f} s  ETA {(time.time() - t0) * (cfg.epochs - epoch - 1):.0f} s", flush=True)
            run.update(epoch=epoch + 1, elapsed=time.time() - t_start)
            data.write_atomic(os.path.join(cfg.out_dir, "ckpt.pt"), {
                **run, "model": trainable_state(model), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "config": dataclasses.asdict(cfg),
                "rng": torch.get_rng_state(),  # evaluation draws none: a resumed run continues from here
                **({"cuda_rng": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})})
            write_log(cfg, run["history"])
    if RANK == 0:
        model.load_state_dict(run["best"], strict=False)
        final_report(cfg, model, sets["test"], loaders["test"], device, caches["test"], run, t_start)
    if WORLD > 1:
        dist.barrier()
        dist.destroy_process_group()


def train_epoch(ddp, train, opt, cfg, device, cache, epoch):
    """One pass over the training clips in an order fixed by seed and epoch -> mean loss; stops on a non-finite loss."""
    ddp.train()
    sampler = torch.utils.data.DistributedSampler(train, seed=cfg.seed) if WORLD > 1 else None
    if sampler is not None:
        sampler.set_epoch(epoch)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)  # the same order after a resume
    loader = torch.utils.data.DataLoader(train, cfg.batch_size, sampler=sampler, shuffle=sampler is None, generator=g)
    total, progress = 0.0, data.Progress(f"  epoch {epoch + 1}", len(loader), show=RANK == 0, keep=False)
    for step, batch in enumerate(loader):
        logits, aux, labels = run_batch(ddp, batch, device, cache, modality_dropout=cfg.modality_dropout)
        loss = loss_fn(logits, labels, aux, cfg)
        if not torch.isfinite(loss):
            kept = "still holds the last good epoch" if epoch > 0 else "was not written: no epoch finished"
            sys.exit(f"[rank {RANK}] loss is {loss.item()} at epoch {epoch + 1} step {step}: stopping; "
                     f"{cfg.out_dir}/ckpt.pt {kept} (rerun with --overwrite=true and a lower --lr)")
        opt.zero_grad(set_to_none=True)
        loss.backward()  # under DDP the gradients are averaged over the processes here
        opt.step()
        total += progress(loss.item())
    return total / len(loader)


def run_batch(model, batch, device, cache=None, remove=None, modality_dropout=0.0):
    """One forward pass (model may be wrapped in DDP) over (frames, fbank, labels), or with a cache over (clip index,
    labels). remove="a" / "v" removes the audio / the frames of every segment; modality_dropout removes each with
    that probability per segment, never both."""
    labels = batch[-1]
    B, S = labels.shape
    removed = {m: torch.full((B, S), remove == m) for m in "av"}  # (B, S) per modality
    if modality_dropout > 0:
        u = torch.rand(B, S)
        removed["a"] = removed["a"] | (u < modality_dropout)
        removed["v"] = removed["v"] | ((u >= modality_dropout) & (u < 2 * modality_dropout))
    if cache is not None:
        logits, aux = model(None, None, states=cache.get(batch[0], removed, device), batch_shape=(B, S))
    else:
        frames, fbank = data.remove_inputs(*batch[:2], removed)
        logits, aux = model(frames, fbank)  # on the model's device: AVModel.inputs
    return logits, aux, labels.to(device)


def loss_fn(logits, labels, aux, cfg):
    """Task loss + lambda_orth * (L_orth_a + L_orth_v) + lambda_balance * load balance."""
    task = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    return task + cfg.lambda_orth * aux["orth"] + cfg.lambda_balance * aux["balance"]


@torch.no_grad()
def evaluate(model, loader, device, cache=None, remove=None):
    """Segment accuracy, confusion, router weights (mean, top-1 share), layer weights, token redundancy (L_orth)."""
    model.eval()
    n = model.cfg.num_classes + 1
    confusion = torch.zeros(n, n, dtype=torch.long)
    orth, router, alpha, preds = 0, {}, {}, []
    for batch in loader:
        logits, aux, labels = run_batch(model, batch, device, cache, remove)
        preds.append(logits.argmax(-1).cpu())
        confusion += torch.bincount(labels.flatten().cpu() * n + preds[-1].flatten(),
                                    minlength=n * n).view(n, n)  # (true, predicted)
        orth += aux["orth"].item() * labels.numel() / len(model.mods)
        for m, w in aux["router"].items():  # (B*S, positions, experts)
            top = F.one_hot(w.argmax(-1), w.shape[-1]).float()
            r = router.setdefault(m, [0, 0])
            r[0] = r[0] + w.sum(0).cpu()
            r[1] = r[1] + top.sum(0).cpu()
        for m, a in aux["alpha"].items():
            alpha[m] = alpha.get(m, 0) + a.sum(0).cpu()
    total = confusion.sum().item()
    return {"acc": confusion.diag().sum().item() / total, "orth": orth / total, "confusion": confusion.tolist(),
            "pred": torch.cat(preds),  # (clips, S)
            "router": {m: {"positions": model.router_positions(m), "mean": (r[0] / total).tolist(),
                           "top1": (r[1] / total).tolist()} for m, r in router.items()},
            "alpha": {m: {"layers": [i + 1 for i in model.layers[m]], "alpha": (a / total).tolist()}
                      for m, a in alpha.items()}}


def final_report(cfg, model, ds, loader, device, cache, run, t_start):
    """Test accuracy as is, with the audio removed and with the frames removed; router and layer weights; the files."""
    test = evaluate(model, loader, device, cache)
    audio_removed = evaluate(model, loader, device, cache, remove="a")
    frames_removed = evaluate(model, loader, device, cache, remove="v")
    counts = param_counts(model)
    metrics = {"test_acc": test["acc"], "val_acc": run["best_val"], "test_acc_audio_removed": audio_removed["acc"],
               "test_acc_frames_removed": frames_removed["acc"], "head_params": counts["head"],
               "trainable_params": counts["adapters"] + counts["head"], "trainable_adapter_params": counts["adapters"],
               "total_params": counts["total"], "mode": cfg.mode, "modalities": cfg.modalities, "world_size": WORLD,
               "checkpoint_sha256": run["checkpoint_sha256"], "clips": run["clips"],  # what settings do not say
               "router_weights": {"normal": test["router"], "audio_removed": audio_removed["router"]},
               "layer_weights": test["alpha"], "token_redundancy": test["orth"], "confusion": test["confusion"],
               "history": run["history"], "config": dataclasses.asdict(cfg), "seconds": round(time.time() - t_start, 1)}
    rest = max(0.0, round(time.time() - t_start - sum(run["seconds"].values()), 1))  # the test, and setting up
    metrics["phase_seconds"] = dict(run["seconds"], **{"test and report": rest})
    both = len(model.mods) == 2  # removing one of two inputs only means something with both
    write_report(os.path.join(cfg.out_dir, "report.html"), cfg, model, ds, metrics, test,
                 audio_removed if both else None)
    data.write_atomic(os.path.join(cfg.out_dir, "metrics.json"), json.dumps(metrics, indent=1))  # last: finished
    print(f"test acc {test['acc']:.3f} (val {run['best_val']:.3f}); audio removed {audio_removed['acc']:.3f}; "
          f"frames removed {frames_removed['acc']:.3f}; the rest in {cfg.out_dir}/report.html")
    print("seconds per phase: " + ", ".join(f"{k} {v:.0f}" for k, v in metrics["phase_seconds"].items()) +
          f"; {metrics['seconds']:.0f} in all")


# ----------------------------------------------------------------------------- stage 0, the data and the feature cache


def pretrain(enc, head, x, y, path, prefix, epochs, cfg, progress):
    """Supervised pre-training of one backbone on single frames or 1 s fbanks (shape / timbre, never the AV task)
    for epochs passes in batches of PRETRAIN_BATCH, saved in the timm layout (prefix "module.v.": the AST repo's)."""
    name, steps = type(enc).__name__, epochs * math.ceil(len(x) / PRETRAIN_BATCH)
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps, pct_start=0.1)  # a ViT needs warm-up
    g = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(epochs):
        correct = 0
        for idx in torch.randperm(len(x), generator=g).split(PRETRAIN_BATCH):
            logits = head(enc.pool(enc.forward_features(x[idx])))
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            correct += (logits.argmax(-1) == y[idx]).sum().item()
            progress()
    log(f"  stage 0 {name}: train acc {correct / len(x):.3f} in the last epoch")
    data.write_atomic(path, timm_state_dict(enc, prefix))


def backbones(cfg):
    """The frozen ViT and AST of the modalities used: the user's files first (before stage 0 trains), else cached."""
    key = f"s{cfg.seed}_d{cfg.dim}x{cfg.depth}h{cfg.heads}_{cfg.image_size}px_{cfg.num_mel_bins}mel_" \
          f"f{cfg.fstride}t{cfg.tstride}_{cfg.pretrain_samples}x{cfg.vit_epochs}-{cfg.ast_epochs}_{data.GENERATOR}"
    used = [name for name, m in (("ViT", "v"), ("AST", "a")) if m in cfg.modalities]
    given = {"ViT": cfg.vit_ckpt, "AST": cfg.ast_ckpt}
    paths = {name: given[name] or os.path.join(cfg.cache_dir, "backbones", f"{stem}_{key}.pth")
             for name, stem in (("ViT", "vit_timm"), ("AST", "ast_repo"))}
    loaded = {name: load_backbone(name, paths[name], cfg) for name in used if given[name]}
    todo = [name for name in used if not given[name] and not os.path.exists(paths[name])]
    if RANK == 0 and todo:
        log(f"stage 0: pre-training small backbones ({' and '.join(todo)}: shapes for the ViT, timbres for the AST)")
        frames, fbanks, shape, timbre = data.generate_pretraining(cfg.seed + 7, cfg.pretrain_samples,
                                                                  cfg.image_size, cfg.num_mel_bins, cfg.workers)
        os.makedirs(os.path.join(cfg.cache_dir, "backbones"), exist_ok=True)
        epochs = {"ViT": cfg.vit_epochs, "AST": cfg.ast_epochs}
        jobs = []  # built here, in order: weight init draws from the global RNG, which threads would interleave
        if "ViT" in todo:
            torch.manual_seed(cfg.seed)
            jobs.append((ViT(cfg.image_size, 8, cfg.dim, cfg.depth, cfg.heads, 4 * cfg.dim),
                         nn.Linear(cfg.dim, len(data.SHAPES) + 1), frames, shape, paths["ViT"], "", epochs["ViT"]))
        if "AST" in todo:
            torch.manual_seed(cfg.seed + 1)
            jobs.append((AST(cfg.num_mel_bins, data.FRAMES_PER_SEGMENT, cfg.fstride, cfg.tstride, cfg.dim, cfg.depth,
                             cfg.heads, 4 * cfg.dim), nn.Linear(cfg.dim, len(data.TIMBRES) + 1), fbanks, timbre,
                         paths["AST"], "module.v.", epochs["AST"]))
        steps = sum(epochs[name] for name in todo) * math.ceil(cfg.pretrain_samples / PRETRAIN_BATCH)
        progress = data.Progress(f"stage 0: pre-training the {' and '.join(todo)} (steps)", steps)
        with data.single_thread(), ThreadPoolExecutor(2) as pool:  # one core each: small models gain little from two
            list(pool.map(lambda job: pretrain(*job, cfg, progress), jobs))
    if WORLD > 1:
        dist.barrier()
    loaded.update({name: load_backbone(name, paths[name], cfg) for name in used if name not in loaded})
    return loaded.get("ViT"), loaded.get("AST")


def load_backbone(name, path, cfg):
    """The ViT or AST at path. Heads cannot be read from weights: ours are known, a user's default to D // 64 unless
    given. A stage-0 cache file that cannot be read is ours, broken: say so, not a user's advice."""
    given = path in (cfg.vit_ckpt, cfg.ast_ckpt)
    heads = (cfg.vit_heads if name == "ViT" else cfg.ast_heads) or (None if given else cfg.heads)
    try:
        if name == "ViT":
            return load_vit(path, image_size=cfg.image_size, num_heads=heads)
        return load_ast(path, cfg.num_mel_bins, data.FRAMES_PER_SEGMENT, cfg.fstride, cfg.tstride, num_heads=heads)
    except ValueError as e:
        if given:
            raise
        raise ValueError(f"the stage-0 cache file {path} is broken ({e}): delete it and rerun, which trains it "
                         "again") from None


def datasets(cfg):
    """{split: dataset} and the number of event classes."""
    if cfg.data == "synthetic":
        cache = os.path.join(cfg.cache_dir, "data")
        splits = data.synthetic_splits(cfg, cache, cfg.workers) if RANK == 0 else None  # one process generates
        if WORLD > 1:
            dist.barrier()
        splits = splits or data.synthetic_splits(cfg, cache)  # the others read its cache
        return {name: data.SyntheticAVE(s, cfg.num_classes) for name, s in splits.items()}, cfg.num_classes
    sets = {s: data.AVEDataset(cfg.prepared_dir, cfg.data_root, s, cfg.image_size, cfg.num_mel_bins)
            for s in ("train", "val", "test")}
    return sets, sets["train"].num_classes


# ----------------------------------------------------------------------------- settings, the run folder and checkpoints


BOOLS = {"": True, "1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
SUMMARY_KEYS = ("test_acc", "test_acc_audio_removed", "test_acc_frames_removed", "val_acc", "token_redundancy",
                "seconds")
RESUME_MAY_DIFFER = {"epochs", "out_dir", "cache_dir", "device", "resume", "overwrite", "workers", "dist_timeout",
                     "vit_ckpt", "ast_ckpt"}  # a checkpoint may move: its content is compared (run_identity)
RUN_CHOICES = {"data": ("synthetic", "ave"), "device": ("auto", "cuda", "mps", "cpu")}
AT_LEAST_ONE = ("num_classes", "train_clips", "val_clips", "test_clips", "workers", "dim", "depth", "heads",
                "pretrain_samples", "vit_epochs", "ast_epochs", "epochs", "batch_size", "lr_step", "dist_timeout",
                "fstride", "tstride")
AT_LEAST_ZERO = ("lr", "weight_decay", "lambda_orth", "lambda_balance", "modality_dropout")  # and lr above 0


def setup(cfg):
    """Device and, under torchrun, the process group; -> device."""
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cfg.device == "cuda" and WORLD > 1 else cfg.device
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)
    if WORLD > 1:  # a rank that waits longer than dist_timeout for the others stops with an error
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                timeout=timedelta(seconds=cfg.dist_timeout))
    torch.manual_seed(cfg.seed)
    return device


def print_help(cfg):
    """The docstring, then every setting with its default and the comment beside its field."""
    notes = {}
    for klass in Config.__mro__[:-1]:  # Config, AVConfig (model.py), SynthConfig (data.py)
        for m in re.finditer(r"^\s+(\w+): \w+ = .*?  # (.*)$", inspect.getsource(klass), re.M):
            notes.setdefault(m[1], m[2])
    print(__doc__)
    for f in dataclasses.fields(cfg):
        print(f"  {f'--{f.name}={getattr(cfg, f.name)}':<26} {notes.get(f.name, '')}")


def parse_config(argv, run=True):
    """--key=value flags -> Config; a bad flag stops with one line before any work. run=False (--probe, --bench):
    out_dir need not be free, since they write neither a checkpoint nor a report."""
    cfg = Config()
    for arg in argv:
        if arg in ("-h", "--help"):
            print_help(cfg)
            sys.exit(0)
        key, _, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not hasattr(cfg, key):
            sys.exit(f"unknown argument {arg}: see python train.py --help")
        kind = type(getattr(cfg, key))
        try:
            setattr(cfg, key, BOOLS[value.lower()] if kind is bool else kind(value))
        except (KeyError, ValueError):
            sys.exit(f"--{key}={value}: expected a value of type {kind.__name__}")
    try:
        check(cfg)
        check_run_dir(cfg, run)
    except ValueError as e:
        sys.exit(f"error: {e}")
    return cfg


def check(cfg):
    """Every setting that can be checked before any work; ValueError names the flag and what to do."""
    check_config(cfg, CHOICES | RUN_CHOICES)
    for key in AT_LEAST_ONE:
        if getattr(cfg, key) < 1:
            raise ValueError(f"--{key} must be at least 1, not {getattr(cfg, key)}")
    for key in AT_LEAST_ZERO:
        if not 0 <= getattr(cfg, key) < math.inf or (key == "lr" and cfg.lr == 0):
            raise ValueError(f"--{key}={getattr(cfg, key)} must be {'positive' if key == 'lr' else 'at least 0'}")
    if not 0 <= cfg.seed < 2 ** 32:
        raise ValueError(f"--seed={cfg.seed}: a seed is between 0 and {2 ** 32 - 1}")
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(cfg.device, True):
        raise ValueError(f"--device={cfg.device}: this machine has no {cfg.device} device; use --device=cpu or auto")
    if cfg.modality_dropout > 0.5:
        raise ValueError("--modality_dropout must be at most 0.5 (audio and frames are never removed together)")
    if cfg.num_mel_bins < 16 or (not cfg.vit_ckpt and (cfg.image_size < 8 or cfg.image_size % 8)):
        raise ValueError("--num_mel_bins must be at least the AST's 16 x 16 patch, and --image_size a multiple of "
                         f"the stage-0 ViT's 8 px patch (got {cfg.num_mel_bins} and {cfg.image_size})")
    if cfg.dim % cfg.heads or cfg.num_classes < 2:
        raise ValueError(f"--dim={cfg.dim} must be divisible by --heads={cfg.heads}, and --num_classes at least 2")
    if cfg.data == "synthetic" and cfg.num_classes > len(data.CLASS_SHAPES):
        raise ValueError(f"--num_classes: the synthetic AVE has at most {len(data.CLASS_SHAPES)} classes (shapes)")
    stage0 = any(m in cfg.modalities and not ckpt for m, ckpt in (("v", cfg.vit_ckpt), ("a", cfg.ast_ckpt)))
    if stage0 and cfg.mode == "molt" and cfg.late_layers > cfg.depth:
        raise ValueError(f"--late_layers={cfg.late_layers} is more than the stage-0 backbones' {cfg.depth} layers")
    for m, flag, path in (("v", "vit_ckpt", cfg.vit_ckpt), ("a", "ast_ckpt", cfg.ast_ckpt)):
        if path and m not in cfg.modalities:
            raise ValueError(f"--{flag} is for a modality that --modalities={cfg.modalities} does not use: drop it")
        if path and not os.path.isfile(path):
            raise ValueError(f"checkpoint {path} {'is a folder' if os.path.isdir(path) else 'not found'}: give a file")
    if cfg.data == "synthetic" and (cfg.data_root or cfg.prepared_dir):
        raise ValueError("--data_root and --prepared_dir are for real AVE: add --data=ave")
    if cfg.data == "ave" and not (os.path.isdir(cfg.data_root) and os.path.isdir(cfg.prepared_dir)):
        raise ValueError("--data=ave needs --data_root=DIR (Annotations.txt, split files) and --prepared_dir=DIR "
                         "(made by: python data.py --prepare_ave DIR --out PREPARED), both existing folders")


def check_run_dir(cfg, run=True):
    """Writable folders; a run's out_dir is its alone, never cleared without --overwrite, resumed only as it was."""
    cache = [os.path.join(cfg.cache_dir, sub) for sub in ("data", "backbones")]
    for folder in [cfg.out_dir, cfg.cache_dir] + [c for c in cache if os.path.isdir(c)]:
        try:
            os.makedirs(folder, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            raise ValueError(f"{folder!r} is not a writable folder ({e.strerror}): see --out_dir/--cache_dir") from None
    if not run:
        return
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: pick one")
    lock_run_dir(cfg.out_dir)
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    earlier = [name for name in RUN_FILES if os.path.exists(os.path.join(cfg.out_dir, name))]
    if earlier and not cfg.overwrite and not (cfg.resume and "ckpt.pt" in earlier):
        resume = "pass --resume=true to continue it, " if "ckpt.pt" in earlier else ""
        raise ValueError(f"{cfg.out_dir} holds an earlier run ({', '.join(earlier)}): {resume}pass --overwrite=true "
                         "to replace it, or choose another --out_dir")
    if not (cfg.resume and "ckpt.pt" in earlier):
        return
    ck = read_checkpoint(path)
    may_differ = RESUME_MAY_DIFFER | ({"num_classes"} if cfg.data == "ave" else set())  # ave: known from data
    diff = {k: (v, getattr(cfg, k, None)) for k, v in ck["config"].items()
            if k not in may_differ and getattr(cfg, k, None) != v}
    diff.update({k: (ck.get(k), v) for k, v in run_identity(cfg).items() if ck.get(k) != v})
    if diff:
        raise ValueError(f"{path} is from another configuration: " + ", ".join(
            f"{k}={a!r} there, {b!r} now" for k, (a, b) in diff.items()) +
            f" (only {', '.join(sorted(RESUME_MAY_DIFFER - {'resume', 'overwrite'}))} may change on --resume)")
    need = ck["epoch"] + ("metrics.json" in earlier)  # a finished run: resuming it as it is would only rewrite it
    if cfg.epochs < need:
        raise ValueError(f"{path} holds {ck['epoch']} finished epochs: resume with --epochs={need} or more")


def run_identity(cfg):
    """Beyond the settings: the number of processes (the effective batch), the checkpoint files' content."""
    digests = {flag: hashlib.sha256(pathlib.Path(getattr(cfg, flag)).read_bytes()).hexdigest()
               for flag in ("vit_ckpt", "ast_ckpt") if getattr(cfg, flag)}
    return {"world_size": WORLD, "checkpoint_sha256": digests}


def lock_run_dir(out_dir):
    """A flock on out_dir/run.lock that ends with the process, even a crashed one; rank 0 holds it; POSIX only."""
    path = os.path.realpath(os.path.join(out_dir, "run.lock"))
    if RANK or os.name != "posix" or path in LOCKS:
        return
    import fcntl  # POSIX only
    f = open(path, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ValueError(f"{out_dir} is in use by another run: wait for it to end, or use another --out_dir") from None
    LOCKS[path] = f  # held until this process exits


def start_or_resume(cfg, model, opt, sched, sets):
    """Clears an earlier run's outputs, or on --resume the results that training on makes stale, and restores what
    the checkpoint holds -> progress: epochs done, best val acc and its weights, history, phase and wall seconds."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    clips = {s: len(ds) for s, ds in sets.items()}  # real AVE: the clips prepared so far
    resuming = cfg.resume and os.path.exists(path)
    for name in ("metrics.json", "report.html") if resuming else RUN_FILES:  # every rank: nothing is written yet
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(cfg.out_dir, name))
    if not resuming:
        if cfg.resume:
            log(f"--resume: no {path} yet, starting from scratch")
        return {"epoch": 0, "best_val": -1.0, "best": trainable_state(model), "history": [], "seconds": {},
                "elapsed": 0.0, "clips": clips, **run_identity(cfg)}
    ck = read_checkpoint(path)  # its settings were compared with these in check_run_dir
    if ck.get("clips", clips) != clips:
        sys.exit(f"{path} was trained on {ck['clips']} clips per split, the data now has {clips}: prepare or remove "
                 "videos back to that state, or rerun with --overwrite=true to start afresh")
    if set(ck["model"]) != {n for n, p in model.named_parameters() if p.requires_grad}:
        sys.exit(f"{path} holds other trainable tensors than this model: was it written by another version?")
    model.load_state_dict(ck["model"], strict=False)  # the trainable part only; the backbones come from stage 0
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    torch.set_rng_state(ck["rng"])
    if "cuda_rng" in ck and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck["cuda_rng"])
    if RANK == 0:
        write_log(cfg, ck["history"])  # drops epochs logged after the checkpoint
    log(f"resumed from {path} after epoch {ck['epoch']}")
    kept = ("epoch", "best_val", "best", "history", "seconds", "elapsed", "world_size", "checkpoint_sha256")
    return {**{k: ck[k] for k in kept}, "clips": clips}  # run_identity: found equal in check_run_dir, not hashed again


def read_checkpoint(path):
    """train.py's checkpoint, or ValueError saying why not (truncated, empty, foreign, unsafe)."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        assert {"config", "epoch", "history", "model", "optimizer", "best"} <= set(ck), "not written by train.py"
        assert all(t.isfinite().all() for t in [*ck["model"].values(), *ck["best"].values()]), "NaN or Inf weights"
        return ck
    except Exception as e:  # nothing of a bad file is used
        reason = str(e).splitlines()[0][:200] if str(e) else "no detail"
        raise ValueError(f"{path} is unreadable ({type(e).__name__}: {reason}): delete it or run with "
                         "--overwrite=true instead of --resume") from None


def trainable_state(model):
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def write_log(cfg, history):
    """log.csv: this run's epochs, rewritten whole from the checkpoint's history (so it never repeats or mixes)."""
    columns = ("epoch", "train_loss", "val_acc", "seconds")
    rows = [columns] + [[h[k] for k in columns] for h in history]
    data.write_atomic(os.path.join(cfg.out_dir, "log.csv"), "".join(",".join(map(str, r)) + "\r\n" for r in rows))


def log(*args):
    if RANK == 0:
        print(*args, flush=True)


@contextlib.contextmanager
def phase(name, seconds):
    """Adds the wall time of a block to seconds[name] (metrics.json's phase_seconds)."""
    t0 = time.time()
    yield
    seconds[name] = round(seconds.get(name, 0) + time.time() - t0, 1)


# ----------------------------------------------------------------------------- --probe, --summary and --bench


@torch.no_grad()
def layer_features(enc, x):
    """Each block's output, averaged over the tokens: inputs (B, ...) -> (B, L, D)."""
    return torch.stack([h.mean(1) for h in enc.block_outputs(x)], 1)  # (B, L, D)


def probe(cfg, max_clips=1000):
    """Where the evidence lives: for each layer of each frozen backbone, the test accuracy of a linear classifier
    (ridge regression onto one-hot targets) on the layer's token-averaged states of single segments, for the class
    that segment's own modality carries (synthetic: the class heard / seen, or none; real AVE: the segment label)."""
    sets, cfg.num_classes = datasets(cfg)
    table = {}
    for m, enc in zip("va", backbones(dataclasses.replace(cfg, modalities="av"))):  # both, whatever the run uses
        xy = []
        for split in ("train", "test"):
            ds = torch.utils.data.Subset(sets[split], range(min(max_clips, len(sets[split]))))
            x = torch.cat([layer_features(enc, (frames if m == "v" else fbank).flatten(0, 1))
                           for frames, fbank, _ in torch.utils.data.DataLoader(ds, 32)])  # (N*S, L, D)
            record = getattr(sets[split], "split", None)
            y = record["audible" if m == "a" else "visible"] if record else torch.stack(list(sets[split].labels))
            xy.append((x, torch.where(y[:len(ds)] < 0, cfg.num_classes, y[:len(ds)]).flatten()))  # none: last class
        table[STREAMS[m]] = ridge_probe(*xy[0], *xy[1])
        print(f"{STREAMS[m]:6} linear probe accuracy by layer: " +
              "  ".join(f"{i + 1}: {a:.3f}" for i, a in enumerate(table[STREAMS[m]])))
    data.write_atomic(os.path.join(cfg.out_dir, "probe.json"), json.dumps(table, indent=1))
    return table


def ridge_probe(x, y, xt, yt, ridge=1e-2):
    """Per layer: standardise with the training statistics, fit ridge regression onto one-hot targets (penalty ridge
    per training sample), and score the test set. x (N, L, D), y (N,), xt (M, L, D), yt (M,) -> [accuracy per layer]"""
    mu, sd = x.mean(0), x.std(0) + 1e-6  # (L, D)
    x, xt = [F.pad((v - mu) / sd, (0, 1), value=1.0) for v in (x, xt)]  # (N, L, D + 1): a constant for the bias
    accuracies = []
    for layer in range(x.shape[1]):
        a = x[:, layer]  # (N, D + 1)
        w = torch.linalg.solve(a.T @ a + ridge * len(a) * torch.eye(a.shape[1]), a.T @ F.one_hot(y).float())
        accuracies.append(round(((xt[:, layer] @ w).argmax(-1) == yt).float().mean().item(), 3))
    return accuracies


def summary(dirs):
    """Mean +- sample std of the runs' metrics.json, all checked before a row is printed: seeds of one setting."""
    if not dirs:
        raise ValueError("--summary needs the run folders to average, e.g. --summary runs/s0 runs/s1 runs/s2")
    runs = {}  # seed -> (metrics.json, its numbers, its setting)
    for path in (os.path.join(d, "metrics.json") for d in dirs):
        try:
            with open(path) as f:
                m = json.load(f)
            numbers = [float(m[key]) for key in SUMMARY_KEYS]
            setting = {k: v for k, v in m["config"].items() if k not in RESUME_MAY_DIFFER - {"epochs"} | {"seed"}}
            seed, setting["world_size"] = m["config"]["seed"], m.get("world_size", 1)
            setting.update({k: m.get(k) for k in ("checkpoint_sha256", "clips")})  # content and data, not paths
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            hint = "; runs from before 2026-12-04 use other key names" if isinstance(e, KeyError) else ""
            raise ValueError(f"{path}: not a finished run's metrics ({type(e).__name__}: {e}{hint})") from None
        first, _, first_setting = next(iter(runs.values()), (path, None, setting))
        diff = sorted(k for k in setting.keys() | first_setting.keys() if setting.get(k) != first_setting.get(k))
        if diff:
            raise ValueError(f"{path} and {first} differ in {diff[0]} ({first_setting.get(diff[0])!r} against "
                             f"{setting.get(diff[0])!r}): --summary averages the seeds of one setting")
        if seed in runs:
            raise ValueError(f"{path} and {runs[seed][0]} are both seed {seed} of one setting: each run counts once")
        runs[seed] = (path, numbers, setting)
    for key, v in zip(SUMMARY_KEYS, torch.tensor([numbers for _, numbers, _ in runs.values()]).T):
        print(f"{key:23} {v.mean():.3f} +- {v.std() if len(v) > 1 else 0:.3f}   ({', '.join(f'{x:.3f}' for x in v)})")


def measure(model, batch, device, steps, cfg):
    """Trainable adapter parameters, bytes autograd saves for backward in one training step (each storage once,
    parameters left out: expanded views of frozen weights would otherwise count a hundredfold), median step time."""
    params, saved, times = {p.untyped_storage().data_ptr() for p in model.parameters()}, {}, []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    for i in range(steps + 1):  # the first step is warm-up, and the one whose saved tensors are counted
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if i == 0 else contextlib.nullcontext():
            logits, aux, labels = run_batch(model, batch, device)
            loss = loss_fn(logits, labels, aux, cfg)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"adapter_params": param_counts(model)["adapters"], "saved_bytes": sum(saved.values()),
            "step_seconds": sorted(times[1:])[len(times[1:]) // 2]}


def bench(cfg, paper_scale=True):
    """AVMoE vs MoLT on the same backbones, batch and widths; then the same counts at the papers' scale."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sets, cfg.num_classes = datasets(cfg)
    batch = next(iter(torch.utils.data.DataLoader(sets["train"], batch_size=cfg.batch_size)))
    scales = {"demo": (*backbones(cfg), batch, 5, cfg.reduction, f"{len(batch[-1])} clips x 10 segments")}
    if paper_scale:  # ViT-B/16 at 192 px and AST-base on a 1 s segment, random weights, one clip of 2 segments
        torch.manual_seed(cfg.seed)
        g, base = torch.Generator().manual_seed(0), dict(dim=768, depth=12, heads=12, mlp_dim=3072)
        big = (torch.randn(1, 2, 3, 192, 192, generator=g),
               torch.randn(1, 2, data.FRAMES_PER_SEGMENT, 128, generator=g), torch.zeros(1, 2, dtype=torch.long))
        scales["paper scale"] = (ViT(image_size=192, patch_size=16, **base),  # the papers' bottleneck is D/8
                                 AST(num_mel_bins=128, target_length=data.FRAMES_PER_SEGMENT, **base), big, 2, 8,
                                 "1 clip x 2 segments, D/8 bottleneck")
    results = {}
    for scale, (vit, ast, b, steps, reduction, _) in scales.items():
        for mode in ("avmoe", "molt"):
            model = AVModel(dataclasses.replace(cfg, mode=mode, reduction=reduction), vit, ast).to(device)
            results[f"{scale} {mode}"] = measure(model, b, device, steps, cfg)
    print(f"{'':24}{'adapter params':>16}{'saved for backward':>20}{'step time':>12}")
    for scale, (*_, about) in scales.items():
        for mode, name in (("avmoe", "AVMoE"), ("molt", "MoLT")):
            r = results[f"{scale} {mode}"]
            print(f"{scale + ' ' + name:24}{r['adapter_params']:>16,}{r['saved_bytes'] / 1e6:>17.1f} MB"
                  f"{r['step_seconds']:>11.3f}s")
        ratio = results[f"{scale} molt / avmoe"] = {k: results[f"{scale} molt"][k] / results[f"{scale} avmoe"][k]
                                                   for k in ("adapter_params", "saved_bytes", "step_seconds")}
        print(f"{scale + ' MoLT / AVMoE':24}{ratio['adapter_params']:>16.3f}{ratio['saved_bytes']:>20.3f}"
              f"{ratio['step_seconds']:>12.3f}   ({about})")
    data.write_atomic(os.path.join(cfg.out_dir, "bench.json"), json.dumps(results, indent=1))


# ----------------------------------------------------------------------------- report.html, for a class to look at


CSS = """body{font:20px/1.4 sans-serif;max-width:1360px;margin:auto;padding:0 20px 40px}
code{background:#eee;padding:4px} svg text{font:18px sans-serif}
h2{font-size:30px;border-top:3px solid #000;padding-top:12px;margin-top:44px}
.row{display:flex;flex-wrap:wrap;gap:36px;align-items:flex-start} .card{border:2px solid #000;padding:8px 16px}
.card b{display:block;font-size:42px} table{border-collapse:collapse} .clip{width:100%;table-layout:fixed}
td,th{border:1px solid #777;padding:4px 6px;text-align:center;font-size:17px} th{background:#eee}
td img{display:block;width:100%;image-rendering:pixelated} .wrong{font-weight:bold;background:#c8c8c8}"""


def command(cfg):
    """The command line that makes this run, pasteable into a shell: the settings that differ from the defaults."""
    default = Config()
    launcher = f"torchrun --nproc_per_node={WORLD} train.py" if WORLD > 1 else "python train.py"
    found = {"device"} | ({"num_classes"} if cfg.data == "ave" else set())  # found at run time, not chosen
    flags = [f"--{k}={v}" for k, v in dataclasses.asdict(cfg).items() if v != getattr(default, k) and k not in found]
    return " ".join([launcher] + [shlex.quote(flag) for flag in flags])


def png(img):
    """uint8 (C, H, W), C = 1 or 3 -> <img> with a PNG inline, written here (torchvision's encoder is deprecated)."""
    def chunk(kind, body):  # length, type, body, CRC of type and body
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    c, h, w = img.shape
    rows = b"".join(b"\0" + row.tobytes() for row in img.permute(1, 2, 0).reshape(h, w * c).numpy())  # filter 0
    head = struct.pack(">IIBBBBB", w, h, 8, 2 if c == 3 else 0, 0, 0, 0)  # 8-bit RGB or grey, no interlace
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def text(x, y, s, anchor="middle", extra=""):
    return f'<text x="{x:.0f}" y="{y:.0f}" text-anchor="{anchor}" {extra}>{html.escape(str(s))}</text>'


def svg(w, h, title, parts):
    """A drawing with its title on top."""
    heading = text(w / 2, 24, title, extra="font-weight=bold")
    return f'<svg width="{w:.0f}" height="{h:.0f}">{heading}{"".join(parts)}</svg>'


def line_chart(title, ys, axis, best, fmt):
    """One value per epoch on axes from zero; a dashed line and a dot mark the selected epoch (1-based)."""
    left, top, pw, ph, hi = 90, 70, 500, 240, max(ys) or 1
    px, py = (lambda i: left + pw * i / max(len(ys) - 1, 1)), (lambda v: top + ph * (1 - v / hi))
    bx, right = px(best - 1), best - 1 > (len(ys) - 1) / 2
    points = " ".join(f"{px(i):.1f},{py(v):.1f}" for i, v in enumerate(ys))
    return svg(left + pw + 30, top + ph + 60, title, [
        f'<path d="M{left},{top}V{top + ph}H{left + pw}" fill="none" stroke="#000" stroke-width="2"/>',  # the axes
        f'<polyline points="{points}" fill="none" stroke="#000" stroke-width="3"/>',
        f'<line x1="{bx:.0f}" x2="{bx:.0f}" y1="{top - 6}" y2="{top + ph}" stroke="#000" stroke-dasharray="7 5"/>',
        f'<circle cx="{bx:.0f}" cy="{py(ys[best - 1]):.0f}" r="7"/>',
        text(bx + (-8 if right else 8), top - 12, f"selected: epoch {best}, {fmt.format(ys[best - 1])}",
             "end" if right else "start"),
        text(left - 8, top + 6, fmt.format(hi), "end"), text(left - 8, top + ph + 6, fmt.format(0), "end"),
        text(left, top + ph + 24, 1), text(left + pw, top + ph + 24, len(ys)),
        text(left + pw / 2, top + ph + 50, "epoch"),
        text(24, top + ph / 2, axis, extra=f'transform="rotate(-90 24 {top + ph / 2:.0f})"')])


def heatmap(title, rows, cols, values):
    """A grey cell per (layer position, expert), darker = more weight, the weight printed in it."""
    left, top, cw, ch = 14 + 9 * max(len(r) for r in rows), 60, 80, 32
    parts = [text(left - 8, top - 8, "layer", "end")]
    parts += [text(left + cw * (j + .5), top - 8, c) for j, c in enumerate(cols)]
    for i, (r, weights) in enumerate(zip(rows, values)):
        parts.append(text(left - 8, top + ch * i + 22, r, "end"))
        for j, v in enumerate(weights):
            g = round(255 - 200 * v)  # white .. dark grey: white text stays readable on the darkest cells
            ink = 'fill="#fff"' if v > 0.55 else ""
            parts += [f'<rect x="{left + cw * j}" y="{top + ch * i}" width="{cw}" height="{ch}" '
                      f'fill="rgb({g},{g},{g})" stroke="#fff"/>',
                      text(left + cw * (j + .5), top + ch * i + 22, f"{v:.2f}", extra=ink)]
    return svg(max(left + cw * len(cols), 10.5 * len(title)) + 10, top + ch * len(rows) + 10, title, parts)


def clip_table(ds, i, preds, names, mods):
    """Test clip i, a column per second: frame, fbank, true label, synthetic role, predictions (wrong: bold, x)."""
    frames, fb, labels = ds[i]
    mean, std = torch.tensor(data.IMAGENET_MEAN)[:, None, None], torch.tensor(data.IMAGENET_STD)[:, None, None]
    frames = ((frames * std + mean) * 255).round().clamp(0, 255).byte()  # (S, 3, H, W), as the camera saw it
    fb = (fb.transpose(1, 2).flip(1) - fb.min()) / (fb.max() - fb.min() + 1e-6)  # (S, F, T): low pitch at the bottom
    rows = {"frame": "v" in mods and [png(f) for f in frames],
            "sound": "a" in mods and [png((255 - 255 * x[None]).byte()) for x in fb],  # loud = dark
            "true": [html.escape(names[y]) for y in labels],
            "synthetic run": hasattr(ds, "split") and [ROLES[r] for r in ds.split["run"][i].tolist()]}
    for name, pred in preds.items():
        rows[name] = [html.escape(f"x {names[p]}" if p != y else names[p]) for p, y in zip(pred[i].tolist(), labels)]
    cell = lambda c: f"<td class=wrong>{c}</td>" if c.startswith("x ") else f"<td>{c}</td>"  # noqa: E731
    body = "".join(f"<tr><th>{k}</th>" + "".join(cell(c) for c in v) + "</tr>" for k, v in rows.items() if v)
    right = (preds["predicted"][i] == labels).sum()
    return f"<h3>Test clip {i}: {right} of {len(labels)} seconds right</h3><table class=clip>{body}</table>"


def headline(cfg, labels, metrics, both, stats):
    """The accuracies beside always-background and the one-modality ceilings, the parameters, the wall time."""
    cards = [("test accuracy", metrics["test_acc"]),
             ("audio removed", metrics["test_acc_audio_removed"] if both else None),
             ("frames removed", metrics["test_acc_frames_removed"] if both else None),
             ("always background", (labels == cfg.num_classes).float().mean().item()),
             ("best with audio only", stats.get("audio_only_ceiling")),
             ("best with frames only", stats.get("visual_only_ceiling"))]
    cards = [(f"{v:.1%}", k) for k, v in cards if v is not None] + [
        (f"{metrics['trainable_params']:,}", f"trainable: {metrics['trainable_adapter_params']:,} adapter + "
                                             f"{metrics['head_params']:,} head"),
        (f"{metrics['seconds'] // 60:.0f} min {metrics['seconds'] % 60:.0f} s", "wall time")]
    return (f"<p><code>{html.escape(command(cfg))}</code></p><div class=row>" +
            "".join(f"<div class=card><b>{v}</b>{k}</div>" for v, k in cards) + "</div>")


def per_class(names, confusion):
    """A row per class: test seconds, accuracy, and the class it was most often taken for."""
    conf = torch.tensor(confusion)  # (true, predicted)
    n, right, wrong = conf.sum(1), conf.diag(), conf.fill_diagonal_(0)
    rows = "".join(f"<tr><td>{html.escape(names[c])}</td><td>{n[c]}</td><td>{right[c] / n[c]:.1%}</td><td>" +
                   (f"{html.escape(names[wrong[c].argmax()])} ({wrong[c].max()})" if wrong[c].max() else "-") +
                   "</td></tr>" for c in range(len(names)) if n[c])
    return f"<table><tr><th>class</th><th>seconds</th><th>accuracy</th><th>most often taken for</th></tr>{rows}</table>"


def write_report(path, cfg, model, ds, metrics, test, audio_removed):
    """report.html: what the run did, on one self-contained page (inline SVG and PNG, no script, no link).
    audio_removed: the evaluation with the audio removed, None with one modality."""
    names = getattr(ds, "class_names", [f"class {c}" for c in range(cfg.num_classes)]) + ["background"]
    labels = torch.stack(list(ds.labels))
    split = getattr(ds, "split", None)
    hist = metrics["history"]
    best = 1 + max(range(len(hist)), key=lambda e: hist[e]["val_acc"]) if hist else None
    both = audio_removed is not None
    experts = [f"CMA {e + 1}" for e in range(cfg.n_cma if both else 0)] + [f"UA {e + 1}" for e in range(cfg.n_ua)]
    order = (test["pred"] == labels).sum(1).argsort(descending=True).tolist()  # clips, most seconds right first
    preds = {"predicted": test["pred"]}
    if both:
        preds["predicted, audio removed"] = audio_removed["pred"]
    routers = {"normal input": test["router"], "audio removed": audio_removed["router"] if both else {}}
    significance = [heatmap(STREAMS[m], [f"layer {i}" for i in a["layers"]], ["alpha"], [[v] for v in a["alpha"]])
                    for m, a in test["alpha"].items()]
    row = lambda parts: "<div class=row>" + "".join(parts) + "</div>"  # noqa: E731
    sections = [  # (title, what to look for, content or nothing)
        ("Headline", "Test clips chose neither the weights nor the epoch. Audio-visual fusion should beat always "
         "answering background and the best one modality can do alone, and fall back when an input is removed.",
         headline(cfg, labels, metrics, both, data.label_stats(split, cfg.num_classes) if split else {})),
        ("Training curves", "The loss should fall and the validation accuracy rise, then level off. The dashed line "
         "marks the epoch with the best validation accuracy: its weights are the ones tested.",
         hist and row([line_chart("Training loss", [e["train_loss"] for e in hist], "loss", best, "{:.2f}"),
                       line_chart("Validation accuracy", [e["val_acc"] for e in hist], "accuracy", best, "{:.0%}")])),
        ("Router: which experts each layer uses", "Mean router weight per layer position and expert (a row sums to "
         "1). CMA experts read the other modality, UA experts do not: with the audio removed, AVMoE's Figure 7 shows "
         "the weight moving to UA.", test["router"] and len(experts) > 1 and row(
             heatmap(f"{STREAMS[m]}, {how}", r[m]["positions"], experts, r[m]["mean"]) for m in test["router"]
             for how, r in routers.items() if r)),
        ("MoLT layer significance", "alpha: the weight MoLT's token fusion gives each layer's tokens (they sum to 1 "
         "per modality). Token redundancy, the mean squared cosine between different layers' tokens: "
         f"{test['orth']:.3f}.", test["alpha"] and row(significance)),
        ("Clip timelines", "The two test clips the model got most right and the two it got most wrong. Sound: "
         "frequency upward, time to the right, darker = louder. Wrong predictions are bold, shaded and marked x. On "
         "synthetic data only the event (heard and seen) counts, not the decoys heard only or seen only.",
         "".join(clip_table(ds, i, preds, names, model.mods) for i in dict.fromkeys(order[:2] + order[-2:]))),
        ("Per-class accuracy", "The share of each class's test seconds predicted right, and what it was most often "
         "taken for.", per_class(names, test["confusion"]))]
    page = "".join(f"<h2>{t}</h2><p>{note}</p>{body}" for t, note, body in sections if body)
    title = f"{cfg.mode} ({cfg.modalities}) on {cfg.data} data"
    data.write_atomic(path, f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{title}</title><style>{CSS}"
                       f"</style></head><body><h1>Report: {title}</h1>{page}</body></html>\n")


def interruptible(cfg):
    """main, and on Ctrl-C one line on what was kept instead of a traceback."""
    try:
        main(cfg)
    except KeyboardInterrupt:
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        sys.exit(f"interrupted: {path} holds the last finished epoch: rerun the same command with --resume=true to "
                 "continue" if os.path.exists(path) else "interrupted: no epoch had finished, nothing to resume")


if __name__ == "__main__":
    try:
        if "--summary" in sys.argv:  # the other arguments are run folders
            summary([a for a in sys.argv[1:] if a != "--summary"])
        elif "--bench" in sys.argv or "--probe" in sys.argv:  # neither writes a checkpoint
            tool = bench if "--bench" in sys.argv else probe
            tool(parse_config([a for a in sys.argv[1:] if a != f"--{tool.__name__}"], run=False))  # not both
        else:
            interruptible(parse_config(sys.argv[1:]))
    except (ValueError, OSError) as e:  # bad input found while working (a checkpoint, an annotation line), a full disk
        sys.exit(f"error: {e}")
