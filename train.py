"""Train and evaluate AVMoE / MoLT adapters on audio-visual event localization.

    python train.py                                 MoLT on the synthetic AVE
    python train.py --mode=avmoe --out_dir=out/avmoe    sequential AVMoE adapters in every layer
    python train.py --mode=frozen --out_dir=out/frozen  the same head on frozen features: what the
                                                        adapters add
    python train.py --modalities=a --out_dir=out/a      audio only (or v)
    python train.py --data=ave --data_root=AVE_Dataset --prepared_dir=prepared
                    --vit_ckpt=... --ast_ckpt=...
    torchrun --nproc_per_node=2 train.py            data parallel (gloo on CPU, nccl on GPU)
    python train.py --bench                         parameters, activation memory and step time:
                                                    AVMoE vs MoLT
    python train.py --probe                         layer-wise linear probe of the frozen backbones
    python train.py --summary out/s0 out/s1 ...     mean +- std over the seeds of one setting

Stage 0 pre-trains small backbones (unless --vit_ckpt/--ast_ckpt are given); stage 1 freezes them
and trains the adapters, selects the epoch on val and reports on test. Each run writes to its own
--out_dir; the generated data and stage-0 backbones are cached in --cache_dir and shared by runs.
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
import re
import reprlib
import shlex
import signal
import struct
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
from model import (AST, BACKBONES, CHOICES, AVConfig, AVModel, ViT, check_config, load_ast,
                   load_vit, param_counts, timm_state_dict)


@dataclasses.dataclass
class Config(AVConfig, data.SynthConfig):
    data: str = "synthetic"  # "synthetic" or "ave" (real AVE, prepared with data.py --prepare_ave)
    data_root: str = ""  # real AVE: the folder with Annotations.txt and the split files
    prepared_dir: str = ""  # real AVE: the output of data.py --prepare_ave
    workers: int = 2  # processes drawing the synthetic set
    vit_ckpt: str = ""  # timm or torchvision ViT weights (.pth, .safetensors); empty: stage 0's
    ast_ckpt: str = ""  # AST-repo or Hugging Face AST weights; empty: pre-train one in stage 0
    vit_heads: int = 0  # attention heads of --vit_ckpt; 0: D // 64
    ast_heads: int = 0  # attention heads of --ast_ckpt; 0: D // 64
    fstride: int = 16  # AST patch stride along frequency; 16: no overlap (the released AST: 10)
    tstride: int = 16  # AST patch stride along time (the released AudioSet AST: 10)
    dim: int = 64  # stage-0 backbones: width
    depth: int = 4  # stage-0 backbones: layers
    heads: int = 4  # stage-0 backbones: attention heads
    pretrain_samples: int = 4000  # stage-0 training images and sounds
    vit_epochs: int = 14  # stage-0 epochs of the ViT: until it names ~98 % of its training images
    ast_epochs: int = 7  # stage-0 epochs of the AST, which learns faster (both train at once)
    epochs: int = 10  # training epochs; the epoch with the best val accuracy is kept
    batch_size: int = 32  # clips of 10 segments per step (per process under torchrun)
    lr: float = 3e-3  # AdamW learning rate
    lr_step: int = 4  # StepLR: lr x 0.35 every lr_step epochs (the official AVE recipe uses 3)
    weight_decay: float = 0.01  # AdamW weight decay
    lambda_orth: float = 0.1  # weight of MoLT's orthogonality loss
    lambda_balance: float = 0.01  # weight of the routers' load-balance loss
    modality_dropout: float = 0.0  # training: remove a segment's audio, or its frames, at this rate
    cache_features: bool = True  # MoLT / frozen: compute the frozen backbone states once per run
    out_dir: str = "out"  # this run's checkpoint, log, metrics and report
    cache_dir: str = "out"  # generated data and stage-0 backbones, shared by runs
    resume: bool = False  # continue the run in out_dir from its ckpt.pt
    overwrite: bool = False  # replace the run (or --probe/--bench result) out_dir holds
    device: str = "auto"  # auto (cuda, then mps, then cpu), cuda, mps or cpu
    dist_timeout: int = 600  # torchrun: seconds a process waits for the others, then stops


RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
STREAMS = {"a": "audio", "v": "visual"}
# the synthetic generator's runs (data.make_clip)
ROLES = {0: "event", 1: "heard only", 2: "seen only", -1: "-"}
PRETRAIN_BATCH = 64  # stage-0 samples per step


# -------------------------------------------------------------- training and evaluation


def main(cfg):
    # the run folder: locked, and everything that can refuse the run decided first
    with Run(cfg) as run:
        device = setup(cfg)
        sets, vit, ast = start(cfg, run)  # the data and the backbones, frozen from here on
        torch.manual_seed(cfg.seed)
        model = AVModel(cfg, vit, ast).to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(model) if WORLD > 1 else model
        counts = param_counts(model)
        log(f"{cfg.mode} ({cfg.modalities}): trainable {counts['adapters']:,} adapter + "
            f"{counts['head']:,} head parameters of {counts['total']:,} in all")
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.StepLR(opt, cfg.lr_step, gamma=0.35)
        run.restore(model, opt, sched)  # --resume: where the checkpoint left off
        with run.phase("feature cache"):
            caches, items, loaders = inputs(cfg, model, sets)
        for epoch in range(run.epoch, cfg.epochs):
            with run.phase("training"):
                loss = train_epoch(ddp, items["train"], opt, cfg, device, caches["train"], epoch)
                sched.step()
            if RANK == 0:
                with run.phase("validation"):
                    val_acc = evaluate(model, loaders["val"], device, caches["val"])["acc"]
                # keeps the best epoch on val, saves
                run.end_epoch(model, opt, sched, loss, val_acc)
        if RANK == 0:
            model.load_state_dict(run.best, strict=False)  # selected on val, never on test
            with run.phase("test and report"):
                final_report(cfg, model, sets["test"], loaders["test"], device, caches["test"], run)
    if WORLD > 1:  # before exit, as NCCL asks; no collective call follows training
        dist.destroy_process_group()


def inputs(cfg, model, sets):
    """What each split's batches hold -> feature caches, datasets, val/test loaders. With the
    feature cache (MoLT, frozen) a batch is (clip indices, labels), never frames and fbanks:
    run_batch then gives the model the cached states of those clips (forward's states=), and the
    backbones never run again."""
    caching = cfg.cache_features and cfg.mode != "avmoe"
    # real AVE: fp16 files in out_dir, unlinked once mapped
    caches = {s: data.FeatureCache(model, ds, cfg.data == "ave" and
                                   os.path.join(cfg.out_dir, f"features_rank{RANK}_{s}"))
              if caching and (s == "train" or RANK == 0) else None  # only rank 0 evaluates
              for s, ds in sets.items()}
    items = {s: torch.utils.data.TensorDataset(torch.arange(len(ds)), ds.labels)
             if caching else ds for s, ds in sets.items()}
    loaders = {s: torch.utils.data.DataLoader(items[s], 2 * cfg.batch_size,
                                              generator=torch.Generator())
               for s in ("val", "test")}  # their own RNG: evaluating draws no random number
    return caches, items, loaders


def train_epoch(ddp, train, opt, cfg, device, cache, epoch):
    """One pass over the training clips in an order fixed by seed and epoch -> mean loss."""
    ddp.train()
    sampler = torch.utils.data.DistributedSampler(train, seed=cfg.seed) if WORLD > 1 else None
    if sampler is not None:
        sampler.set_epoch(epoch)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)  # the same order after a resume
    loader = torch.utils.data.DataLoader(train, cfg.batch_size, sampler=sampler,
                                         shuffle=sampler is None, generator=g)
    total = 0.0
    progress = data.Progress(f"  epoch {epoch + 1}", len(loader), keep=False)
    for step, batch in enumerate(loader):
        logits, aux, labels = run_batch(ddp, batch, device, cache,
                                        modality_dropout=cfg.modality_dropout)
        loss = loss_fn(logits, labels, aux, cfg)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1} step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()  # under DDP the gradients are averaged over the processes here
        opt.step()
        total += progress(loss.item())
    return total / len(loader)


def run_batch(model, batch, device, cache=None, remove=None, modality_dropout=0.0):
    """One forward pass (model may be wrapped in DDP) over (frames, fbank, labels), or with a cache
    over (clip index, labels). remove="a" / "v" removes the audio / the frames of every segment;
    modality_dropout removes each with that probability per segment, never both."""
    labels = batch[-1]
    B, S = labels.shape
    removed = {m: torch.full((B, S), remove == m) for m in "av"}  # (B, S) per modality
    if modality_dropout > 0:
        u = torch.rand(B, S)
        removed["a"] |= u < modality_dropout
        removed["v"] |= (u >= modality_dropout) & (u < 2 * modality_dropout)
    if cache is not None:
        states = cache.get(batch[0], removed, device)
        logits, aux = model(None, None, states=states, batch_shape=(B, S))
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
    """Segment accuracy, confusion, router weights (mean, top-1 share), layer weights, token
    redundancy."""
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
            mean, top1 = router.get(m, (0, 0))
            router[m] = (mean + w.sum(0).cpu(), top1 + F.one_hot(w.argmax(-1), w.shape[-1]).sum(0))
        for m, a in aux["alpha"].items():
            alpha[m] = alpha.get(m, 0) + a.sum(0).cpu()
    total = confusion.sum().item()
    return {"acc": confusion.diag().sum().item() / total, "orth": orth / total,
            "confusion": confusion.tolist(), "pred": torch.cat(preds),  # (clips, S)
            "router": {m: {"positions": model.router_positions(m), "mean": (r[0] / total).tolist(),
                           "top1": (r[1] / total).tolist()} for m, r in router.items()},
            "alpha": {m: {"layers": [i + 1 for i in model.layers[m]], "alpha": (a / total).tolist()}
                      for m, a in alpha.items()}}


def final_report(cfg, model, ds, loader, device, cache, run):
    """Test accuracy as is, with the audio removed and with the frames removed; router and layer
    weights. A number that means nothing for this run is None (null): removing one of two inputs
    needs both, and token redundancy is MoLT's."""
    test = evaluate(model, loader, device, cache)
    both = len(model.mods) == 2
    audio_removed, frames_removed = [evaluate(model, loader, device, cache, remove=m) if both
                                     else None for m in "av"]
    counts = param_counts(model)
    metrics = {
        "test_acc": test["acc"], "val_acc": run.best_val,
        "test_acc_audio_removed": audio_removed and audio_removed["acc"],
        "test_acc_frames_removed": frames_removed and frames_removed["acc"],
        "head_params": counts["head"], "trainable_params": counts["adapters"] + counts["head"],
        "trainable_adapter_params": counts["adapters"], "total_params": counts["total"],
        "mode": cfg.mode, "modalities": cfg.modalities, "world_size": WORLD,
        "router_weights": {"normal": test["router"],
                           "audio_removed": audio_removed["router"] if both else {}},
        "layer_weights": test["alpha"],
        "token_redundancy": test["orth"] if cfg.mode == "molt" else None,
        "confusion": test["confusion"], "history": run.history}
    run.finish(metrics,
               lambda path: write_report(path, cfg, model, ds, metrics, test, audio_removed))
    print(f"test acc {test['acc']:.3f} (val {run.best_val:.3f}); audio removed "
          f"{percent(metrics['test_acc_audio_removed'])}; frames removed "
          f"{percent(metrics['test_acc_frames_removed'])}; the rest in {cfg.out_dir}/report.html")
    print("seconds per phase: "
          + ", ".join(f"{k} {v:.0f}" for k, v in metrics["phase_seconds"].items())
          + f"; {metrics['seconds']:.0f} in all")


def percent(x):
    return "-" if x is None else f"{x:.3f}"


# -------------------------------------------------------------- the backbones and the data


def pretrain(enc, head, x, y, path, prefix, epochs, cfg, progress, stop):
    """Supervised pre-training of one backbone on single frames or 1 s fbanks (shape / timbre, never
    the AV task) for epochs passes in batches of PRETRAIN_BATCH, saved in the timm layout (prefix
    "module.v.": the AST repo's). Returns early, saving nothing, once stop is set (Ctrl-C)."""
    steps = epochs * math.ceil(len(x) / PRETRAIN_BATCH)
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=2e-3, weight_decay=0.05)
    # warm-up
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(epochs):
        correct = 0
        for idx in torch.randperm(len(x), generator=g).split(PRETRAIN_BATCH):
            if stop.is_set():
                return
            logits = head(enc.pool(enc.forward_features(x[idx])))
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            correct += (logits.argmax(-1) == y[idx]).sum().item()
            progress()
    log(f"  stage 0 {type(enc).__name__}: train acc {correct / len(x):.3f} in the last epoch")
    data.write_atomic(path, timm_state_dict(enc, prefix))


def stage0(cfg, todo, paths):
    """Pre-trains the backbones named in todo at once, a thread each, and caches them at paths."""
    frames, fbanks, shape, timbre = data.generate_pretraining(cfg.seed + 7, cfg.pretrain_samples,
                                                              cfg.image_size, cfg.num_mel_bins,
                                                              cfg.workers)
    os.makedirs(os.path.join(cfg.cache_dir, "backbones"), exist_ok=True)
    # name: inputs, labels, classes, epochs, key prefix (the AST repo's "module.v.")
    tasks = {"ViT": (frames, shape, data.SHAPES, cfg.vit_epochs, ""),
             "AST": (fbanks, timbre, data.TIMBRES, cfg.ast_epochs, "module.v.")}
    jobs = []
    # built here, in order: weight init draws from the global RNG, which threads would interleave
    for seed, (name, (x, y, classes, epochs, prefix)) in enumerate(tasks.items()):
        if name in todo:
            torch.manual_seed(cfg.seed + seed)
            enc = AST(cfg.num_mel_bins, data.FRAMES_PER_SEGMENT, cfg.fstride, cfg.tstride, cfg.dim,
                      cfg.depth, cfg.heads, 4 * cfg.dim) if name == "AST" else \
                ViT(cfg.image_size, 8, cfg.dim, cfg.depth, cfg.heads, 4 * cfg.dim)
            jobs.append((enc, nn.Linear(cfg.dim, len(classes) + 1), x, y, paths[name], prefix,
                         epochs))
    steps = sum(job[-1] for job in jobs) * math.ceil(cfg.pretrain_samples / PRETRAIN_BATCH)
    progress = data.Progress(f"stage 0: pre-training the {' and '.join(todo)} on shapes / timbres "
                             "(steps)", steps)
    stop = threading.Event()
    # small models gain little from two cores
    with data.single_thread(), ThreadPoolExecutor(2) as pool:
        try:
            list(pool.map(lambda job: pretrain(*job, cfg, progress, stop), jobs))
        except BaseException:  # Ctrl-C: the threads stop at their next step instead of training on
            stop.set()
            raise


def start(cfg, run):
    """What a run starts from, each part joining its identity as it becomes known: the user's
    checkpoints (read before any data work), the data, then the frozen backbones (stage 0 trains
    the missing ones) -> (datasets, ViT, AST)."""
    given = user_backbones(cfg, run)
    with run.phase("data"):
        sets = datasets(cfg, run)
    with run.phase("stage 0"):
        return (sets, *backbones(cfg, run, given))


def user_backbones(cfg, run=None):
    """The user's --vit_ckpt / --ast_ckpt of the modalities used, read and checked before any data
    work, and their content recorded in the run's identity -> {name: backbone}."""
    given = {name: getattr(cfg, flag) for name, (m, flag, *_) in BACKBONES.items()
             if m in cfg.modalities and getattr(cfg, flag)}
    return read_backbones(cfg, run, given)


def backbones(cfg, run=None, loaded=None):
    """The frozen ViT and AST of the modalities used: the user's (loaded), else stage 0's, trained
    once and cached in cache_dir, whose files' content joins the run's identity -> (ViT, AST)."""
    key = f"s{cfg.seed}_d{cfg.dim}x{cfg.depth}h{cfg.heads}_{cfg.image_size}px_" \
          f"{cfg.num_mel_bins}mel_f{cfg.fstride}t{cfg.tstride}_" \
          f"{cfg.pretrain_samples}x{cfg.vit_epochs}-{cfg.ast_epochs}_" \
          f"{data.GENERATOR}"
    paths = {name: os.path.join(cfg.cache_dir, "backbones", f"{name.lower()}_{key}.pth")
             for name, (m, *_) in BACKBONES.items()
             if m in cfg.modalities and name not in (loaded or {})}
    todo = [name for name, path in paths.items() if not os.path.exists(path)]
    if RANK == 0 and todo:
        stage0(cfg, todo, paths)
    if WORLD > 1:
        dist.barrier()
    loaded = {**(loaded or {}), **read_backbones(cfg, run, paths)}
    return loaded.get("ViT"), loaded.get("AST")


def read_backbones(cfg, run, paths):
    """{name: path} -> {name: backbone}, the files' content recorded in the run's identity first."""
    if run:
        run.check(weights={name: hashlib.sha256(Path(path).read_bytes()).hexdigest()
                           for name, path in paths.items()})
    return {name: load_backbone(name, path, cfg) for name, path in paths.items()}


def load_backbone(name, path, cfg):
    """The ViT or AST at path. Heads cannot be read from weights: ours are known, a user's are given
    or guessed. A stage-0 cache file that cannot be read is ours, broken: say so."""
    _, flag, heads_flag, *_ = BACKBONES[name]
    given = path == getattr(cfg, flag)
    heads = getattr(cfg, heads_flag) or None if given else cfg.heads
    try:
        if name == "ViT":
            enc = load_vit(path, image_size=cfg.image_size, num_heads=heads)
        else:
            enc = load_ast(path, cfg.num_mel_bins, data.FRAMES_PER_SEGMENT, cfg.fstride,
                           cfg.tstride, num_heads=heads)
    except ValueError as e:
        if given:
            raise ValueError(f"--{flag}: {e}") from None
        raise ValueError(f"the stage-0 cache file {path} is broken: delete it and rerun, "
                         "which trains it again") from None
    check_fits(cfg, f"{name}'s", enc.dim, len(enc.blocks))
    return enc


def check_fits(cfg, whose, width, depth):
    """--reduction within a backbone's width (else an empty bottleneck), --late_layers its depth."""
    if cfg.reduction > width:
        raise ValueError(f"--reduction={cfg.reduction} is more than the {whose} width {width}")
    if cfg.mode == "molt" and cfg.late_layers > depth:
        raise ValueError(f"--late_layers={cfg.late_layers} is more than the {whose} {depth} layers")


def datasets(cfg, run=None):
    """{split: dataset}; the data joins the run's identity: class names in order, and per split the
    clips and a digest of their ids and labels (real AVE: also the frames' prepared size)."""
    if cfg.data == "synthetic":
        cache = os.path.join(cfg.cache_dir, "data")
        # one process draws
        splits = data.synthetic_splits(cfg, cache, cfg.workers) if RANK == 0 else None
        if WORLD > 1:
            dist.barrier()
        splits = splits or data.synthetic_splits(cfg, cache)  # the others read its cache
        sets = {name: data.SyntheticAVE(s, cfg.num_classes) for name, s in splits.items()}
    else:
        sets = {s: data.AVEDataset(cfg.prepared_dir, cfg.data_root, s, cfg.image_size,
                                   cfg.num_mel_bins)
                for s in ("train", "val", "test")}
        cfg.num_classes = sets["train"].num_classes
    record = {"classes": sets["train"].class_names}
    for s, ds in sets.items():
        ids = [os.path.basename(f) for f in getattr(ds, "files", [])]  # synthetic: the clips' order
        digest = hashlib.sha256(json.dumps(ids).encode() + ds.labels.numpy().tobytes())
        record[s] = {"clips": len(ds), "sha256": digest.hexdigest()}
    if cfg.data == "ave":
        record["prepared_px"] = data.check_prepared(sets["train"].files[0])
    if run:
        run.check(data=record)
    return sets


# ----------------------------------------------------------------------------- the run's record


MAY_DIFFER = {"epochs", "out_dir", "cache_dir", "device", "resume", "overwrite", "workers",
              "dist_timeout",
              # paths: their content is compared
              "vit_ckpt", "ast_ckpt", "data_root", "prepared_dir"}


class Run:
    """One run's record in out_dir: the folder and its lock, the run's identity, resume, the
    per-epoch checkpoint and log.csv, the phase times and the final files; tool="probe" / "bench"
    writes one result file.

    The identity is what makes two runs the same experiment: the settings (but MAY_DIFFER), the
    number of processes, the content of every weight file the run starts from and the data it trains
    on. --resume compares all of it with the checkpoint's, part by part as each becomes known,
    before any earlier file is touched; --overwrite removes the earlier run's files only once this
    run has written its first checkpoint. A refused run leaves the folder as it found it."""

    def __init__(self, cfg, tool=None):
        self.cfg, self.tool, self.t0, self.seconds = cfg, tool, time.time(), {}
        self.path = self.file(f"{tool}_seed{cfg.seed}.json" if tool else "ckpt.pt")
        self.epoch, self.best_val, self.best, self.history, self.last = 0, -1.0, None, [], {}
        self.saved, self.ck, self.created, self.lock, self.handlers = False, None, [], None, {}
        self.identity = {"kind": tool or "train"}
        outputs = [self.path] if tool else [self.file(f) for f in RUN_FILES]
        self.earlier = [p for p in outputs if os.path.lexists(p)]
        found = self.path in self.earlier
        try:
            for p in filter(os.path.isdir, self.earlier):
                raise ValueError(f"{p} is a folder, not a run's file: move it or choose another "
                                 "--out_dir")
            self.take_folder()
            if self.earlier and not cfg.overwrite and not (cfg.resume and found):
                resume = "pass --resume=true to continue it, " if found and not tool else ""
                raise ValueError(f"{cfg.out_dir} holds an earlier {tool or 'run'} ("
                                 f"{', '.join(map(os.path.basename, self.earlier))}): {resume}pass "
                                 "--overwrite=true to replace it, or choose another --out_dir")
            if cfg.resume and found:
                self.ck = read_checkpoint(self.path)
                self.epoch = self.ck["epoch"]  # what a Ctrl-C before restore() leaves
                finished = self.file("metrics.json") in self.earlier
                # as many: it would only rewrite the results
                if cfg.epochs < self.epoch + finished:
                    raise ValueError(f"{self.path} holds {self.epoch} finished epochs"
                                     f"{' and their results' if finished else ''}: resume with "
                                     f"--epochs={self.epoch + finished} or more")
            elif cfg.resume:
                log(f"--resume: no {self.path} yet, starting from scratch")
            self.check(settings=settings(cfg))
        except BaseException:
            self.release()
            raise

    def file(self, name):
        """A file in the run folder."""
        return os.path.join(self.cfg.out_dir, name)

    def take_folder(self):
        """Creates out_dir if needed and takes its lock (rank 0; POSIX flock, dropped when the
        process ends, even a crashed one)."""
        if not os.path.isdir(self.cfg.out_dir):
            self.created.append(self.cfg.out_dir)
        os.makedirs(self.cfg.out_dir, exist_ok=True)
        lock = self.file("run.lock")
        if RANK or os.name != "posix":
            return
        import fcntl  # POSIX only
        if not os.path.exists(lock):
            self.created.insert(0, lock)
        self.lock = open(lock, "a")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ValueError(f"{self.cfg.out_dir} is in use by another run: wait for it to end, or "
                             "use another --out_dir") from None

    def check(self, **parts):
        """Adds parts to the run's identity; on --resume each must equal the checkpoint's."""
        for part, record in parts.items():
            self.identity.setdefault(part, {}).update(record)
            old = self.ck["identity"].get(part, {}) if self.ck else record
            diff = differences({part: {k: old.get(k) for k in record}}, {part: record})
            if diff:
                raise ValueError(f"--resume: {self.path} is from another run: " + "; ".join(
                    f"{k}={a} there, {b} now" for k, a, b in diff[:3]) +
                    " (start afresh with --overwrite=true)")

    @contextlib.contextmanager
    def phase(self, name):
        """Adds the wall time of a block to this phase's seconds (metrics.json's phase_seconds);
        self.last[name] is the block's alone."""
        t = time.time()
        try:
            yield
        finally:
            self.last[name] = time.time() - t
            self.seconds[name] = self.seconds.get(name, 0) + self.last[name]

    def restore(self, model, opt, sched):
        """Starts afresh, or on --resume restores what the checkpoint holds; checks the disk has
        room for the checkpoints first."""
        state = trainable_state(model)
        # the new checkpoint is written beside the old one; each holds the weights, the best ones
        # and Adam's two moments, in float32, and 1 MB more
        need = 2 * (5 * 4 * sum(t.numel() for t in state.values()) + 2 ** 20)
        if RANK == 0:
            data.check_room(self.cfg.out_dir, need, "the checkpoints need",
                            "or choose another --out_dir")
        ck, self.best = self.ck, state
        if ck is None:
            return
        if {k: v.shape for k, v in ck["model"].items()} != {k: v.shape for k, v in state.items()}:
            raise ValueError(f"--resume: {self.path} holds another model's tensors: start afresh "
                             "with --overwrite=true")
        # the trainable part; the backbones are frozen
        model.load_state_dict(ck["model"], strict=False)
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng"])
        if "cuda_rng" in ck and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["cuda_rng"])
        self.epoch, self.best_val, self.best, self.history = (ck["epoch"], ck["best_val"],
                                                              ck["best"], ck["history"])
        for k, v in ck["seconds"].items():  # a resumed run's times count the earlier processes too
            self.seconds[k] = self.seconds.get(k, 0) + v
        self.t0, self.ck = self.t0 - ck["elapsed"], None
        log(f"resumed from {self.path} after epoch {self.epoch}")

    def end_epoch(self, model, opt, sched, loss, val_acc):
        """Keeps the weights if val accuracy is the best so far; saves the checkpoint, log.csv."""
        t = self.last["training"] + self.last["validation"]
        state = trainable_state(model)
        if val_acc > self.best_val:  # model selection on val, never on test
            self.best_val, self.best = val_acc, state
        self.epoch += 1
        self.history.append({"epoch": self.epoch, "train_loss": round(loss, 4),
                             "val_acc": round(val_acc, 4), "seconds": round(t, 2)})
        left = self.cfg.epochs - self.epoch
        print(f"\repoch {self.epoch}/{self.cfg.epochs}: loss {loss:.3f}  val acc {val_acc:.3f}  "
              f"{t:.1f} s  ETA {t * left:.0f} s", flush=True)
        with self.phase("checkpoints"):
            self.save({"identity": self.identity, "epoch": self.epoch, "best_val": self.best_val,
                       "best": self.best, "history": self.history, "seconds": self.seconds,
                       "elapsed": time.time() - self.t0, "model": state,
                       "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                       "config": dataclasses.asdict(self.cfg), "rng": torch.get_rng_state(),
                       **({"cuda_rng": torch.cuda.get_rng_state_all()}
                          if torch.cuda.is_available() else {})})
            rows = [self.history[0].keys()] + [h.values() for h in self.history]  # a header, epochs
            text = "".join(",".join(map(str, r)) + "\r\n" for r in rows)
            data.write_atomic(self.file("log.csv"), text)

    def save(self, checkpoint):
        """The checkpoint, atomically; the first one of this process also removes what it makes
        stale: the earlier run's files (--overwrite), or a resumed run's results."""
        data.write_atomic(self.path, checkpoint)
        if not self.saved:
            stale = RUN_FILES[1:] if self.cfg.overwrite else ("metrics.json", "report.html")
            for name in stale:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.file(name))
            self.saved = True

    def finish(self, results, write_page=None):
        """The final files: report.html (write_page(path)), then metrics.json, whose presence marks
        a finished run; or a tool's result file. Both record settings, identity and times."""
        seconds = time.time() - self.t0
        # the rest: the test, the report and setting up
        self.seconds["test and report"] = max(0.0, seconds - sum(self.seconds.values()))
        results.update(config=dataclasses.asdict(self.cfg), identity=self.identity,
                       seconds=round(seconds, 1),
                       phase_seconds={k: round(v, 1) for k, v in self.seconds.items()})
        if write_page:
            write_page(self.file("report.html"))
        data.write_atomic(self.file("metrics.json") if not self.tool
                          else self.path, json.dumps(results, indent=1))

    def kept(self):
        """What the run folder holds for a rerun, in words (for Ctrl-C and a diverging loss)."""
        if self.epoch and (self.saved or self.cfg.resume):
            again = command(dataclasses.replace(self.cfg, resume=True, overwrite=False))
            return (f"{self.path} keeps epoch {self.epoch} of {self.cfg.epochs}: "
                    f"continue with {again}")
        if self.cfg.overwrite and self.earlier:
            return f"the earlier run in {self.cfg.out_dir} is untouched"
        return "no epoch had finished, nothing to resume"

    def release(self):
        """Drops the lock; before the first checkpoint, also removes what this run created itself
        (the lock file, an empty out_dir)."""
        if self.lock:
            self.lock.close()
        for path in self.created if not self.saved else []:
            with contextlib.suppress(OSError):
                os.rmdir(path) if os.path.isdir(path) else os.remove(path)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            # SIGTERM and SIGHUP (a closed terminal or ssh connection) act as Ctrl-C
            self.handlers = {s: signal.signal(s, signal.default_int_handler) for s in data.SIGNALS}
        return self

    def __exit__(self, kind, error, tb):
        for s, handler in self.handlers.items():
            signal.signal(s, handler)
        # a run stopped before its first checkpoint leaves the folder as it found it
        self.release()
        if kind is KeyboardInterrupt:
            raise SystemExit(f"interrupted: {self.kept()}" if RANK == 0 else 1) from None
        if kind is FloatingPointError:
            raise SystemExit(f"error: {error}: stopping; {self.kept()} (or rerun with "
                             "--overwrite=true and a lower --lr)" if RANK == 0 else 1) from None


RUN_FILES = ("ckpt.pt", "log.csv", "metrics.json", "report.html")  # what a run writes in out_dir


def settings(cfg):
    """The settings that make a run what it is, and the number of processes (torchrun: the effective
    batch). Real AVE: the classes come from the data."""
    found = {"num_classes"} if cfg.data == "ave" else set()
    return dict({k: v for k, v in dataclasses.asdict(cfg).items() if k not in MAY_DIFFER | found},
                world_size=WORLD)


def differences(old, new, free=()):
    """Where two identities differ: [(key, old value, new value)], nested keys joined by dots,
    values shortened for a message."""
    old, new = flat(old), flat(new)
    return [(k, reprlib.repr(old.get(k)), reprlib.repr(new.get(k)))
            for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k) and k not in free]


def flat(record, prefix=""):
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    out = {}
    for k, v in record.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {prefix + k: v})
    return out


def read_checkpoint(path):
    """train.py's checkpoint, or ValueError saying why not (broken, foreign, unsafe, older)."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # nothing of a bad file is used
        reason = str(e).splitlines()[0][:200] if str(e) else "no detail"
        why = f"is unreadable ({type(e).__name__}: {reason}): delete it or"
    else:
        ours = isinstance(ck, dict) and {"config", "epoch", "model", "optimizer", "best"} <= set(ck)
        weights = [*ck["model"].values(), *ck["best"].values()] if ours else []
        why = ("was not written by train.py:" if not ours else
               "is from an earlier train.py, which recorded no run identity:"
               if "identity" not in ck else
               "holds NaN or Inf weights:" if not all(t.isfinite().all() for t in weights)
               else None)
    if why:
        raise ValueError(f"{path} {why} run with --overwrite=true instead of --resume")
    return ck


def trainable_state(model):
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def log(*args):
    if RANK == 0:
        print(*args, flush=True)


# ----------------------------------------------------------------------------- settings


BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
RUN_CHOICES = {"data": ("synthetic", "ave"), "device": ("auto", "cuda", "mps", "cpu")}


def setup(cfg):
    """Device and, under torchrun, the process group; -> device."""
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "mps" \
            if torch.backends.mps.is_available() else "cpu"
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cfg.device == "cuda" and WORLD > 1 \
        else cfg.device
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)
    if WORLD > 1:  # a rank that waits longer than dist_timeout for the others stops with an error
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                timeout=timedelta(seconds=cfg.dist_timeout))
    return device


def print_help(cfg):
    """The docstring, then every setting with its default and the comment beside its field."""
    notes = {}
    for klass in Config.__mro__[:-1]:  # Config, AVConfig (model.py), SynthConfig (data.py)
        # a comment too long for one line goes on below, aligned with its "#"
        for m in re.finditer(r"^\s+(\w+): \w+ = .*?  # (.*(?:\n {5,}# .*)*)$",
                             inspect.getsource(klass), re.M):
            notes.setdefault(m[1], re.sub(r"\n\s+# ", " ", m[2]))
    print(__doc__)
    for f in dataclasses.fields(cfg):
        print(f"  {f'--{f.name}={getattr(cfg, f.name)}':<26} {notes.get(f.name, '')}")


def parse_config(argv, tool=None):
    """--key=value or --key value flags -> Config, checked; a bad flag stops with one line (printed
    once under torchrun) before any work. tool: "probe" or "bench", which take no --resume."""
    cfg, types, given = Config(), {f.name: f.type for f in dataclasses.fields(Config)}, set()
    args = list(argv)
    try:
        while args:
            arg = args.pop(0)
            if arg in ("-h", "--help"):
                print_help(cfg)
                sys.exit(0)
            key, eq, value = arg.removeprefix("--").partition("=")
            if not arg.startswith("--") or key not in types:
                raise ValueError(f"unknown argument {arg}: see python train.py --help")
            kind = types[key]
            if (not eq and args and not args[0].startswith("--") and
                    (kind is not bool or args[0] in BOOLS)):
                value = args.pop(0)  # --key value
            elif not eq and kind is bool:
                value = "true"  # a bare --resume
            # the command line's bytes that are not UTF-8 arrive as U+DC80..U+DCFF (surrogateescape)
            if any("\udc80" <= c <= "\udcff" for c in value):
                raise ValueError(f"--{key}: the name is not valid UTF-8: choose another")
            try:
                value = BOOLS[value.lower()] if kind is bool else kind(value)
            except (KeyError, ValueError):
                raise ValueError(f"--{key}={value}: expected a value of type "
                                 f"{kind.__name__}") from None
            # ~ expanded as a shell would: a text setting is a path or one of a few choices
            setattr(cfg, key, os.path.expanduser(value) if kind is str else value)
            given.add(key)
        refused = {"resume"} | ({"mode"} if tool == "bench" else set())  # --bench runs both modes
        if tool and refused & given:
            raise ValueError(f"--{tool} takes no --{min(refused & given)}: drop it")
        if (cfg.data == "ave" and cfg.vit_ckpt and "image_size" not in given and
                os.path.isfile(cfg.vit_ckpt)):
            vit = load_vit(cfg.vit_ckpt, num_heads=cfg.vit_heads or None)  # at its own size
            cfg.image_size = vit.grid[0] * vit.patch_embed.stride[0]
        check(cfg)
    except ValueError as e:
        sys.exit(f"error: {e}" if RANK == 0 else 1)  # under torchrun, the line once
    return cfg


def check(cfg):
    """Every setting that can be checked before any work; ValueError names the flag and fix."""
    check_config(cfg, CHOICES | RUN_CHOICES)
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    for broken, message in (  # checked in this order
            (cfg.lr == 0, "--lr must be above 0"),
            (cfg.resume and cfg.overwrite,
             "--resume and --overwrite contradict each other: pick one"),
            (not available.get(cfg.device, True),
             f"--device={cfg.device}: this machine has none; use --device=cpu or auto"),
            # a segment never loses both inputs
            (cfg.modality_dropout > 0.5, "--modality_dropout must be at most 0.5"),
            # the AST's patch is 16, a 25 ms window has 257 frequencies, stage 0's ViT's patch is 8
            (not 16 <= cfg.num_mel_bins <= 256 or (not cfg.vit_ckpt and cfg.image_size % 8),
             f"--num_mel_bins={cfg.num_mel_bins} must be 16 to 256 and --image_size="
             f"{cfg.image_size} a multiple of 8"),
            (cfg.dim % cfg.heads or cfg.num_classes < 2,
             f"--dim={cfg.dim} must be divisible by --heads={cfg.heads}, and --num_classes at "
             "least 2"),
            (cfg.data == "synthetic" and cfg.num_classes > len(data.CLASS_SHAPES),
             f"--num_classes: the synthetic AVE has {len(data.CLASS_SHAPES)} at most"),
            (cfg.data == "synthetic" and (cfg.data_root or cfg.prepared_dir),
             "--data_root and --prepared_dir are for real AVE: add --data=ave"),
            (cfg.data == "ave" and not (os.path.isdir(cfg.data_root) and
                                        os.path.isdir(cfg.prepared_dir)),
             "--data=ave needs the folders --data_root (Annotations.txt, split files) and "
             "--prepared_dir (python data.py --prepare_ave ROOT --out DIR)")):
        if broken:
            raise ValueError(message)
    for m, flag, *_ in BACKBONES.values():
        path = getattr(cfg, flag)
        if not path and m in cfg.modalities:
            check_fits(cfg, "stage-0 backbones'", cfg.dim, cfg.depth)
        elif path and m not in cfg.modalities:
            raise ValueError(f"--{flag} is for a modality that --modalities={cfg.modalities} does "
                             "not use: drop it")
        elif path and not os.path.isfile(path):
            raise ValueError(f"--{flag}={path} "
                             f"{'is a folder' if os.path.isdir(path) else 'not found'}: "
                             "give a file")
    check_memory(cfg)
    for flag in ("out_dir", "cache_dir"):
        data.check_folder(getattr(cfg, flag), f"--{flag}")


def check_memory(cfg):
    """The sizes that obviously cannot fit: the synthetic clips (uint8 frames, fp16 fbanks) and the
    stage-0 samples (float32), each held twice (stored, then used), and the parameters of the
    stage-0 backbones, the latent tokens and the head, with gradients and Adam's two moments."""
    segment = 3 * cfg.image_size ** 2 + 2 * data.FRAMES_PER_SEGMENT * cfg.num_mel_bins
    clips = (cfg.train_clips + cfg.val_clips + cfg.test_clips) * (cfg.data == "synthetic")
    params = (24 * cfg.depth * cfg.dim ** 2 + 3 * cfg.head_dim ** 2 +  # blocks, head's conv
              4 * cfg.depth * cfg.latent_tokens * cfg.dim * (cfg.n_cma + cfg.n_ua))
    need = 2 * (clips * data.SECONDS + 4 * cfg.pretrain_samples) * segment + 16 * params
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if os.name == "posix" else need
    if need > total:
        raise ValueError(f"the data and the models need {need / 1e9:.0f} GB of memory of "
                         f"{total / 1e9:.0f}: lower the clips, --pretrain_samples, --image_size, "
                         "--num_mel_bins, --dim, --depth, --head_dim or --latent_tokens")


# -------------------------------------------------------------- --probe, --summary and --bench


@torch.no_grad()
def layer_features(enc, x):
    """Each block's output, averaged over the tokens: inputs (B, ...) -> (B, L, D)."""
    return torch.stack([h.mean(1) for h in enc.block_outputs(x)], 1)  # (B, L, D)


def probe(cfg, max_clips=1000):
    """Where the evidence lives: for each layer of each frozen backbone, the test accuracy of a
    linear classifier (ridge regression onto one-hot targets) on the layer's token-averaged states
    of single segments, for the class that segment's own modality carries (synthetic: the class
    heard / seen, or none; real AVE: the segment label). Written to out_dir/probe_seed{seed}.json
    with the run's identity."""
    with Run(cfg, "probe") as run:
        # both backbones, whatever the run uses
        sets, *encoders = start(dataclasses.replace(cfg, modalities="av"), run)
        table = {}
        for m, enc in zip("va", encoders):
            xy = []
            for split in ("train", "test"):
                ds = torch.utils.data.Subset(sets[split], range(min(max_clips, len(sets[split]))))
                # (N*S, L, D)
                x = torch.cat([layer_features(enc, (frames if m == "v" else fbank).flatten(0, 1))
                               for frames, fbank, _ in torch.utils.data.DataLoader(ds, 32)])
                record = getattr(sets[split], "split", None)
                y = record["audible" if m == "a" else "visible"] if record else sets[split].labels
                # none: last class
                y = torch.where(y[:len(ds)] < 0, cfg.num_classes, y[:len(ds)]).flatten()
                xy.append((x, y))
            table[STREAMS[m]] = ridge_probe(*xy[0], *xy[1])
            print(f"{STREAMS[m]:6} linear probe accuracy by layer: " +
                  "  ".join(f"{i + 1}: {a:.3f}" for i, a in enumerate(table[STREAMS[m]])))
        run.finish({"probe": table})
    return table


def ridge_probe(x, y, xt, yt, ridge=1e-2):
    """Per layer: standardise with the training statistics, fit ridge regression onto one-hot
    targets (penalty ridge per training sample), and score the test set. x (N, L, D), y (N,), xt (M,
    L, D), yt (M,) -> [accuracy per layer]"""
    mu, sd = x.mean(0), x.std(0) + 1e-6  # (L, D)
    x, xt = [F.pad((v - mu) / sd, (0, 1), value=1.0) for v in (x, xt)]  # (N, L, D + 1): bias column
    accuracies = []
    for layer in range(x.shape[1]):
        a = x[:, layer]  # (N, D + 1)
        w = torch.linalg.solve(a.T @ a + ridge * len(a) * torch.eye(a.shape[1]),
                               a.T @ F.one_hot(y).float())
        accuracies.append(round(((xt[:, layer] @ w).argmax(-1) == yt).float().mean().item(), 3))
    return accuracies


SUMMARY_KEYS = ("test_acc", "test_acc_audio_removed", "test_acc_frames_removed", "val_acc",
                "token_redundancy", "seconds")


def summary(paths):
    """Mean +- sample std over runs that differ in their seed alone: run folders (their
    metrics.json), or metrics.json / probe_seed*.json files; all checked before a row prints."""
    paths = [os.path.join(p, "metrics.json") if os.path.isdir(p) else os.fspath(p) for p in paths]
    if not paths or any(p.startswith("--") for p in paths):
        raise ValueError("--summary takes run folders or their metrics.json / probe_seed*.json "
                         "files, e.g. --summary runs/s0 runs/s1 runs/s2"
                         f"{', not ' + min(paths) if paths else ''}")
    runs, first = {}, None  # seed -> (path, its numbers); the first file and what it ran
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
            config, numbers = record["config"], summary_numbers(record)
            seed, ran = config["seed"], dict(record["identity"], epochs=config["epochs"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a finished run's metrics.json or --probe file, or one "
                             "from an earlier train.py, which recorded no run identity "
                             f"({type(e).__name__}: {e})") from None
        first = first or (path, ran)
        # what the seed alone produces may differ: its synthetic data, its stage-0 backbones
        free = {"settings.seed", *(f"data.{s}.sha256" for s in ("train", "val", "test")
                                   if config["data"] == "synthetic"),
                *(f"weights.{name}" for name, (_, flag, *_) in BACKBONES.items()
                  if not config[flag])}
        diff = differences(first[1], ran, free)
        if diff:
            key, a, b = diff[0]
            raise ValueError(f"{first[0]} and {path} differ in {key} ({a} against {b}): --summary "
                             "averages the seeds of one setting")
        if seed in runs:
            raise ValueError(f"{path} and {runs[seed][0]} are both seed {seed} of one setting: "
                             "each run counts once")
        runs[seed] = (path, numbers)
    rows = {}
    for _, numbers in runs.values():
        for key, value in numbers.items():
            rows.setdefault(key, []).append(value)
    for key, values in rows.items():
        v = torch.tensor([x for x in values if x is not None], dtype=torch.float64)
        print(f"{key:48} " + (f"{v.mean():.3f} +- {v.std() if len(v) > 1 else 0:.3f}   "
                              f"({', '.join(f'{x:.3f}' for x in v)})" if len(v) else "-"))


def summary_numbers(record):
    """A run's numbers to average, by name: the metrics, the router weights (mean and top-1 share
    per expert), the probe's accuracy per layer."""
    if "probe" in record:
        return {f"probe {m} layer {i + 1}": a
                for m, acc in record["probe"].items() for i, a in enumerate(acc)}
    numbers = {key: record[key] for key in SUMMARY_KEYS}
    cfg = record["config"]
    names = expert_names(cfg, cfg["modalities"] == "av")
    for how, routers in record["router_weights"].items():
        for m, r in routers.items():
            for pos, mean, top in zip(r["positions"], r["mean"], r["top1"]):
                for name, w, t in zip(names, mean, top):
                    numbers[f"router {how} {STREAMS[m]} {pos} {name}"] = w
                    numbers[f"router {how} {STREAMS[m]} {pos} {name} top-1"] = t
    return numbers


def expert_names(cfg, both):
    """A mixture's experts in its router weights' order: CMA first (none with one modality)."""
    return [f"CMA {e + 1}" for e in range(cfg["n_cma"] if both else 0)] + \
        [f"UA {e + 1}" for e in range(cfg["n_ua"])]


def measure(model, batch, device, steps, cfg):
    """Trainable adapter parameters, bytes autograd saves for backward in one training step (each
    storage once, parameters left out: expanded views of frozen weights would otherwise count a
    hundredfold), median step time."""
    params, saved, times = {p.untyped_storage().data_ptr() for p in model.parameters()}, {}, []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    # the first step is warm-up, and the one whose saved tensors are counted
    for i in range(steps + 1):
        t0 = time.perf_counter()
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if i == 0 \
            else contextlib.nullcontext()
        with hooks:
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
    """AVMoE vs MoLT on the same backbones, batch and widths; then the same counts at the papers'
    scale. Written to out_dir/bench_seed{seed}.json with the run's identity."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with Run(cfg, "bench") as run:
        sets, vit, ast = start(cfg, run)
        batch = next(iter(torch.utils.data.DataLoader(sets["train"], batch_size=cfg.batch_size)))
        scales = {"demo": (vit, ast, batch, 5, cfg.reduction,
                           f"{len(batch[-1])} clips x 10 segments")}
        # ViT-B/16 at 192 px and AST-base on a 1 s segment, random weights, 1 clip of 2 s
        if paper_scale:
            torch.manual_seed(cfg.seed)
            base = dict(dim=768, depth=12, heads=12, mlp_dim=3072)
            big = (torch.randn(1, 2, 3, 192, 192), torch.randn(1, 2, data.FRAMES_PER_SEGMENT, 128),
                   torch.zeros(1, 2, dtype=torch.long))
            scales["paper scale"] = (ViT(image_size=192, patch_size=16, **base),  # the papers' D/8
                                     AST(num_mel_bins=128, target_length=data.FRAMES_PER_SEGMENT,
                                         **base),
                                     big, 2, 8, "1 clip x 2 segments, D/8 bottleneck")
        results = {}
        for scale, (vit, ast, b, steps, reduction, _) in scales.items():
            for mode in ("avmoe", "molt"):
                model = AVModel(dataclasses.replace(cfg, mode=mode, reduction=reduction),
                                vit, ast).to(device)
                results[f"{scale} {mode}"] = measure(model, b, device, steps, cfg)
            results[f"{scale} molt / avmoe"] = {k: v / results[f"{scale} avmoe"][k]
                                                for k, v in results[f"{scale} molt"].items()}
        print(f"{'':24}{'adapter params':>16}{'saved for backward (MB)':>25}{'step time (s)':>15}")
        for name, r in results.items():  # a ratio: 3 decimals for all three
            ratio = "/" in name
            print(f"{name:24}{r['adapter_params']:>16{'.3f' if ratio else ','}}"
                  f"{r['saved_bytes'] / (1 if ratio else 1e6):>25.3f}{r['step_seconds']:>15.3f}")
        print("; ".join(f"{scale}: {about}" for scale, (*_, about) in scales.items()))
        run.finish({"bench": results})


# -------------------------------------------------------------- report.html, for a class to look at


CSS = """body{font:20px/1.4 sans-serif;max-width:1360px;margin:auto;padding:0 20px 40px}
code{background:#eee;padding:4px} svg text{font:18px sans-serif}
h2{font-size:30px;border-top:3px solid #000;padding-top:12px;margin-top:44px}
.row{display:flex;flex-wrap:wrap;gap:36px;align-items:flex-start} \
.card{border:2px solid #000;padding:8px 16px}
.card b{display:block;font-size:42px} table{border-collapse:collapse} \
.clip{width:100%;table-layout:fixed}
td,th{border:1px solid #777;padding:4px 6px;text-align:center;font-size:17px} th{background:#eee}
td img{display:block;width:100%;image-rendering:pixelated} \
.wrong{font-weight:bold;background:#c8c8c8}"""


def command(cfg):
    """The command line that makes this run, pasteable into a shell: settings not at default."""
    default = Config()
    launcher = f"torchrun --nproc_per_node={WORLD} train.py" if WORLD > 1 else "python train.py"
    # found at run time, not chosen
    found = {"device"} | ({"num_classes"} if cfg.data == "ave" else set())
    flags = [f"--{k}={str(v).lower() if isinstance(v, bool) else v}"
             for k, v in dataclasses.asdict(cfg).items()
             if v != getattr(default, k) and k not in found]
    return f"{launcher} {shlex.join(flags)}".strip()


def png(img):
    """uint8 (C, H, W), C = 1 or 3 -> <img>, a PNG written here (torchvision's is deprecated)."""
    def chunk(kind, body):  # length, type, body, CRC of type and body
        return (struct.pack(">I", len(body)) + kind + body +
                struct.pack(">I", zlib.crc32(kind + body)))
    c, h, w = img.shape
    # filter 0
    rows = b"".join(b"\0" + row.tobytes() for row in img.permute(1, 2, 0).reshape(h, w * c).numpy())
    # 8-bit RGB or grey, no interlace
    head = struct.pack(">IIBBBBB", w, h, 8, 2 if c == 3 else 0, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(rows)) +
            chunk(b"IEND", b""))
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def text(x, y, s, anchor="middle", extra=""):
    return (f'<text x="{x:.0f}" y="{y:.0f}" text-anchor="{anchor}" {extra}>'
            f'{html.escape(str(s))}</text>')


def svg(w, h, title, parts):
    """A drawing with its title on top."""
    heading = text(w / 2, 24, title, extra="font-weight=bold")
    return f'<svg width="{w:.0f}" height="{h:.0f}">{heading}{"".join(parts)}</svg>'


def line_chart(title, ys, axis, best, fmt):
    """One value per epoch on axes from zero; a dashed line and a dot mark the selected epoch."""
    left, top, pw, ph, hi = 90, 70, 500, 240, max(ys) or 1
    px, py = (lambda i: left + pw * i / max(len(ys) - 1, 1)), (lambda v: top + ph * (1 - v / hi))
    bx, right = px(best - 1), best - 1 > (len(ys) - 1) / 2
    points = " ".join(f"{px(i):.1f},{py(v):.1f}" for i, v in enumerate(ys))
    return svg(left + pw + 30, top + ph + 60, title, [
        # the axes
        f'<path d="M{left},{top}V{top + ph}H{left + pw}" fill="none" stroke="#000" '
        'stroke-width="2"/>',
        f'<polyline points="{points}" fill="none" stroke="#000" stroke-width="3"/>',
        f'<line x1="{bx:.0f}" x2="{bx:.0f}" y1="{top - 6}" y2="{top + ph}" stroke="#000" '
        'stroke-dasharray="7 5"/>',
        f'<circle cx="{bx:.0f}" cy="{py(ys[best - 1]):.0f}" r="7"/>',
        text(bx + (-8 if right else 8), top - 12,
             f"selected: epoch {best}, {fmt.format(ys[best - 1])}", "end" if right else "start"),
        text(left - 8, top + 6, fmt.format(hi), "end"),
        text(left - 8, top + ph + 6, fmt.format(0), "end"),
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
            # white .. dark grey: white text stays readable on the darkest cells
            g = round(255 - 200 * v)
            ink = 'fill="#fff"' if v > 0.55 else ""
            parts += [f'<rect x="{left + cw * j}" y="{top + ch * i}" width="{cw}" height="{ch}" '
                      f'fill="rgb({g},{g},{g})" stroke="#fff"/>',
                      text(left + cw * (j + .5), top + ch * i + 22, f"{v:.2f}", extra=ink)]
    return svg(max(left + cw * len(cols), 10.5 * len(title)) + 10, top + ch * len(rows) + 10, title,
               parts)


def clip_table(ds, i, preds, names, mods):
    """Test clip i, a column per second: frame, fbank, label, synthetic role, predictions (x)."""
    frames, fb, labels = ds[i]
    # (S, 3, H, W), as the camera saw it
    frames = (data.imagenet_normalise(frames, undo=True) * 255).round().clamp(0, 255).byte()
    # (S, F, T): low pitch at the bottom
    fb = (fb.transpose(1, 2).flip(1) - fb.min()) / (fb.max() - fb.min() + 1e-6)
    rows = {"frame": "v" in mods and [png(f) for f in frames],
            "sound": "a" in mods and [png((255 - 255 * x[None]).byte()) for x in fb],  # loud = dark
            "true": [names[y] for y in labels],
            "synthetic run": hasattr(ds, "split") and [ROLES[r]
                                                       for r in ds.split["run"][i].tolist()]}
    for name, pred in preds.items():
        rows[name] = [f"x {names[p]}" if p != y else names[p]
                      for p, y in zip(pred[i].tolist(), labels)]
    # text escaped (an image is ours); a wrong prediction shaded
    cell = lambda c: (f"<td{' class=wrong' * c.startswith('x ')}>"  # noqa: E731
                      f"{c if c.startswith('<img') else html.escape(c)}</td>")
    body = "".join(f"<tr><th>{k}</th>" + "".join(cell(c) for c in v) + "</tr>"
                   for k, v in rows.items() if v)
    right = (preds["predicted"][i] == labels).sum()
    return (f"<h3>Test clip {i}: {right} of {len(labels)} seconds right</h3>"
            f"<table class=clip>{body}</table>")


def headline(cfg, labels, metrics, split):
    """Accuracies beside always-background and the one-modality ceilings (synthetic data: from the
    generator's record); parameters; wall time."""
    cards = [("test accuracy", metrics["test_acc"]),
             ("audio removed", metrics["test_acc_audio_removed"]),
             ("frames removed", metrics["test_acc_frames_removed"]),
             ("always background", (labels == cfg.num_classes).float().mean().item()),
             *[(f"best with {what} only", split and data.unimodal_ceiling(split, m))
               for m, what in (("a", "audio"), ("v", "frames"))]]
    cards = [(f"{v:.1%}", k) for k, v in cards if v is not None] + [
        (f"{metrics['trainable_params']:,}",
         f"trainable: {metrics['trainable_adapter_params']:,} adapter + "
         f"{metrics['head_params']:,} head"),
        (f"{metrics['seconds'] // 60:.0f} min {metrics['seconds'] % 60:.0f} s", "wall time")]
    return (f"<p><code>{html.escape(command(cfg))}</code></p><div class=row>" +
            "".join(f"<div class=card><b>{v}</b>{k}</div>" for v, k in cards) + "</div>")


def per_class(names, confusion):
    """A row per class: test seconds, accuracy, and the class it was most often taken for."""
    conf = torch.tensor(confusion)  # (true, predicted)
    n, right, wrong = conf.sum(1), conf.diag(), conf.fill_diagonal_(0)
    rows = "".join(f"<tr><td>{html.escape(names[c])}</td><td>{n[c]}</td>"
                   f"<td>{right[c] / n[c]:.1%}</td><td>" +
                   (f"{html.escape(names[wrong[c].argmax()])} ({wrong[c].max()})"
                    if wrong[c].max() else "-") +
                   "</td></tr>" for c in range(len(names)) if n[c])
    return ("<table><tr><th>class</th><th>seconds</th><th>accuracy</th>"
            f"<th>most often taken for</th></tr>{rows}</table>")


def write_report(path, cfg, model, ds, metrics, test, audio_removed):
    """report.html: what the run did, on one self-contained page (inline SVG and PNG, no script, no
    link). audio_removed: the evaluation with the audio removed, None with one modality."""
    names = ds.class_names + ["background"]
    labels = ds.labels  # (clips, S)
    split = getattr(ds, "split", None)
    hist = metrics["history"]
    best = 1 + max(range(len(hist)), key=lambda e: hist[e]["val_acc"])  # the epoch kept
    both = audio_removed is not None
    experts = expert_names(dataclasses.asdict(cfg), both)
    # clips, most seconds right first
    order = (test["pred"] == labels).sum(1).argsort(descending=True).tolist()
    preds = {"predicted": test["pred"]}
    if both:
        preds["predicted, audio removed"] = audio_removed["pred"]
    routers = {"normal input": test["router"],
               "audio removed": audio_removed["router"] if both else {}}
    row = lambda parts: "<div class=row>" + "".join(parts) + "</div>"  # noqa: E731
    sections = [  # (title, what to look for, content or nothing)
        ("Headline", "Test clips chose neither the weights nor the epoch. Audio-visual fusion "
         "should beat always answering background and the best one modality can do alone, and "
         "fall back when an input is removed.",
         headline(cfg, labels, metrics, split)),
        ("Training curves", "The loss should fall and the validation accuracy rise, then level "
         "off. The dashed line marks the epoch with the best validation accuracy: its weights are "
         "the ones tested.",
         row([line_chart("Training loss", [e["train_loss"] for e in hist], "loss", best, "{:.2f}"),
              line_chart("Validation accuracy", [e["val_acc"] for e in hist], "accuracy", best,
                         "{:.0%}")])),
        ("Router: which experts each layer uses", "Mean router weight per layer position and "
         "expert (a row sums to 1). CMA experts read the other modality, UA experts do not: with "
         "the audio removed, AVMoE's Figure 7 shows the weight moving to UA.",
         test["router"] and len(experts) > 1 and row(
             heatmap(f"{STREAMS[m]}, {how}", r[m]["positions"], experts, r[m]["mean"])
             for m in test["router"] for how, r in routers.items() if r)),
        ("MoLT layer significance", "alpha: the weight MoLT's token fusion gives each layer's "
         "tokens (they sum to 1 per modality). Token redundancy, the mean squared cosine between "
         f"different layers' tokens: {test['orth']:.3f}.",
         test["alpha"] and row(heatmap(STREAMS[m], [f"layer {i}" for i in a["layers"]], ["alpha"],
                                       [[v] for v in a["alpha"]])
                               for m, a in test["alpha"].items())),
        ("Clip timelines", "The two test clips the model got most right and the two it got most "
         "wrong. Sound: frequency upward, time to the right, darker = louder. Wrong predictions "
         "are bold, shaded and marked x. On synthetic data only the event (heard and seen) counts, "
         "not the decoys heard only or seen only.",
         "".join(clip_table(ds, i, preds, names, model.mods)
                 for i in dict.fromkeys(order[:2] + order[-2:]))),
        ("Per-class accuracy", "The share of each class's test seconds predicted right, and what "
         "it was most often taken for.", per_class(names, test["confusion"]))]
    page = "".join(f"<h2>{t}</h2><p>{note}</p>{body}" for t, note, body in sections if body)
    title = f"{cfg.mode} ({cfg.modalities}) on {cfg.data} data"
    data.write_atomic(path, "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
                            f"<title>{title}</title><style>{CSS}</style></head>"
                            f"<body><h1>Report: {title}</h1>{page}</body></html>\n")


if __name__ == "__main__":
    try:
        tool = next((t for t in ("summary", "bench", "probe") if f"--{t}" in sys.argv), None)
        args = [a for a in sys.argv[1:] if a != f"--{tool}"]  # the flags, or --summary's files
        if tool == "summary":
            summary(args)
        else:  # a run, or --bench / --probe: one result file each, never a checkpoint
            {"bench": bench, "probe": probe, None: main}[tool](parse_config(args, tool))
    except (ValueError, OSError) as e:  # bad input found while working, a full disk
        sys.exit(f"error: {e}" if RANK == 0 else 1)  # under torchrun, the line once
