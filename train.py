"""Train and evaluate AVMoE / MoLT adapters on audio-visual event localization.

    python train.py                                   MoLT on the synthetic AVE (about 2 min 15 s on a 2-core CPU)
    python train.py --mode=avmoe                      sequential AVMoE adapters in every layer
    python train.py --mode=frozen                     the same head on frozen features: what the adapters add
    python train.py --modalities=a                    audio only (or v)
    python train.py --data=ave --data_root=AVE_Dataset --prepared_dir=prepared --vit_ckpt=... --ast_ckpt=...
    torchrun --nproc_per_node=2 train.py              data parallel (gloo on CPU, nccl on GPU)
    python train.py --bench                           parameters, activation memory and step time: AVMoE vs MoLT

Stage 0 pre-trains the small backbones on a task of their own (unless --vit_ckpt/--ast_ckpt are given), saves them
in the timm and AST-repo layouts and loads them back through load_vit/load_ast. Stage 1 freezes them and trains the
adapters; the model is selected on val and reported on test. Every setting below is a --key=value flag.
"""
import contextlib
import csv
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import data
from model import AST, AVConfig, AVModel, ViT, load_ast, load_vit, param_counts, timm_state_dict


@dataclass
class Config(AVConfig):
    # data
    data: str = "synthetic"  # "synthetic" or "ave" (prepared with data.py --prepare_ave)
    data_root: str = ""  # real AVE: the folder with Annotations.txt and the split files
    prepared_dir: str = ""  # real AVE: the output of data.py --prepare_ave
    image_size: int = 32
    num_mel_bins: int = 64
    train_clips: int = 2500  # synthetic split sizes
    val_clips: int = 200
    test_clips: int = 300
    seed: int = 0
    # backbones: real checkpoints, or stage 0 pre-training of small ones
    vit_ckpt: str = ""
    ast_ckpt: str = ""
    vit_heads: int = 0  # 0: D // 64
    ast_heads: int = 0
    fstride: int = 10
    tstride: int = 10
    dim: int = 64  # stage-0 backbones
    depth: int = 4
    heads: int = 4
    pretrain_samples: int = 4000
    pretrain_epochs: int = 3
    # adaptation
    epochs: int = 16
    batch_size: int = 16  # clips of 10 segments
    lr: float = 3e-3
    lr_step: int = 6  # StepLR: lr x 0.35 every lr_step epochs (the official AVE recipe uses 3)
    weight_decay: float = 0.01
    lambda_orth: float = 0.1
    lambda_balance: float = 0.01
    modality_dropout: float = 0.0  # training: remove a segment's audio, or its frames, with this probability each
    cache_features: bool = True  # MoLT / frozen: compute the frozen backbone states once (real AVE: fp16 files)
    # run
    out_dir: str = "out"
    resume: bool = False
    device: str = "auto"


RESUME_MAY_DIFFER = {"epochs", "out_dir", "device", "resume"}
CHOICES = {"mode": ("molt", "avmoe", "frozen"), "modalities": ("av", "a", "v"), "molt_layers": ("late", "early", "all"),
           "data": ("synthetic", "ave"), "device": ("auto", "cuda", "mps", "cpu")}


def parse_config(argv):
    cfg = Config()
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__)
            for f in dataclasses.fields(cfg):
                print(f"  --{f.name}={getattr(cfg, f.name)}")
            sys.exit(0)
        key, _, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not hasattr(cfg, key):
            sys.exit(f"unknown argument {arg}: see python train.py --help")
        kind = type(getattr(cfg, key))
        try:
            if kind is bool and value.lower() not in ("", "1", "0", "true", "false", "yes", "no"):
                raise ValueError
            setattr(cfg, key, value.lower() in ("", "1", "true", "yes") if kind is bool else kind(value))
        except ValueError:
            sys.exit(f"--{key}={value}: expected a value of type {kind.__name__}")
    for key, choices in CHOICES.items():
        if getattr(cfg, key) not in choices:
            sys.exit(f"--{key} must be one of {', '.join(choices)}, not {getattr(cfg, key)!r}")
    return cfg


def log(*args):
    if RANK == 0:
        print(*args, flush=True)


# ----------------------------------------------------------------------------- stage 0: backbones


def pretrain(enc, x, y, cfg, name):
    """Supervised pre-training of one backbone on single frames or single 1 s fbanks (a task of its own)."""
    head = nn.Linear(enc.dim, int(y.max()) + 1)
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(cfg.pretrain_epochs):
        correct, t0 = 0, time.time()
        for idx in torch.randperm(len(x), generator=g).split(64):
            logits = head(enc.pool(enc.forward_features(x[idx])))
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            correct += (logits.argmax(-1) == y[idx]).sum().item()
        log(f"  stage 0 {name} epoch {epoch + 1}/{cfg.pretrain_epochs}: train acc {correct / len(x):.3f} "
            f"({time.time() - t0:.0f} s)")


def backbones(cfg):
    """The frozen ViT and AST: from the user's checkpoints, or pre-trained here once and cached in out_dir."""
    key = f"s{cfg.seed}_d{cfg.dim}x{cfg.depth}h{cfg.heads}_{cfg.image_size}px_{cfg.num_mel_bins}mel_" \
          f"f{cfg.fstride}t{cfg.tstride}_{cfg.pretrain_samples}x{cfg.pretrain_epochs}"
    vit_path = cfg.vit_ckpt or os.path.join(cfg.out_dir, "backbones", f"vit_timm_{key}.pth")
    ast_path = cfg.ast_ckpt or os.path.join(cfg.out_dir, "backbones", f"ast_repo_{key}.pth")
    todo = [name for name, given, path in (("ViT", cfg.vit_ckpt, vit_path), ("AST", cfg.ast_ckpt, ast_path))
            if not given and not os.path.exists(path)]
    if RANK == 0 and todo:
        log(f"stage 0: pre-training small backbones ({' and '.join(todo)}: shapes for the ViT, timbres for the AST)")
        frames, fbanks, shape, timbre = data.generate_pretraining(cfg.seed + 7, cfg.pretrain_samples,
                                                                  cfg.image_size, cfg.num_mel_bins)
        os.makedirs(os.path.join(cfg.out_dir, "backbones"), exist_ok=True)
        if "ViT" in todo:
            torch.manual_seed(cfg.seed)
            vit = ViT(cfg.image_size, 8, cfg.dim, cfg.depth, cfg.heads, 4 * cfg.dim)
            pretrain(vit, frames, shape, cfg, "ViT")
            save_checkpoint(vit_path, timm_state_dict(vit))  # the layout timm writes
        if "AST" in todo:
            torch.manual_seed(cfg.seed + 1)
            ast = AST(cfg.num_mel_bins, 100, cfg.fstride, cfg.tstride, cfg.dim, cfg.depth, cfg.heads, 4 * cfg.dim)
            pretrain(ast, fbanks, timbre, cfg, "AST")
            save_checkpoint(ast_path, timm_state_dict(ast, "module.v."))  # the layout the AST repo writes
    if WORLD > 1:
        dist.barrier()
    # heads cannot be read from weights: ours are known; a user's default to D // 64 unless given
    vit = load_vit(vit_path, image_size=cfg.image_size, num_heads=cfg.vit_heads or (None if cfg.vit_ckpt else cfg.heads))
    ast = load_ast(ast_path, cfg.num_mel_bins, 100, cfg.fstride, cfg.tstride,
                   num_heads=cfg.ast_heads or (None if cfg.ast_ckpt else cfg.heads))
    return vit, ast


# ----------------------------------------------------------------------------- data and the feature cache


def datasets(cfg):
    if cfg.data == "synthetic":
        cache = os.path.join(cfg.out_dir, "data")
        if RANK == 0:  # one process generates and caches, the others then read the cache
            data.synthetic_splits(cfg, cache)
        if WORLD > 1:
            dist.barrier()
        splits = data.synthetic_splits(cfg, cache)
        return {name: data.SyntheticAVE(s) for name, s in splits.items()}, cfg.num_classes
    if cfg.data == "ave":
        if not (cfg.data_root and cfg.prepared_dir):
            sys.exit("--data=ave needs --data_root=DIR (Annotations.txt, split files) and --prepared_dir=DIR "
                     "(made by: python data.py --prepare_ave DIR --out PREPARED)")
        sets = {s: data.AVEDataset(cfg.prepared_dir, cfg.data_root, s, cfg.image_size, cfg.num_mel_bins)
                for s in ("train", "val", "test")}
        return sets, sets["train"].num_classes


class Indexed(torch.utils.data.Dataset):
    """Adds the item index, so cached backbone states can be looked up per clip; with a cache, the frames and fbanks
    are not loaded at all (empty tensors stand in for them)."""

    def __init__(self, ds, inputs=True):
        self.ds, self.inputs = ds, inputs

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return (*self.ds[i], i) if self.inputs else (torch.empty(0), torch.empty(0), self.ds.labels[i], i)


def remove(frames, fbank, drop_frames, drop_audio):
    """Remove frames / audio of the segments where the (B, S) masks are true, as SPEC 2 defines removal."""
    if frames is not None and drop_frames.any():
        frames = torch.where(drop_frames[..., None, None, None], data.remove_frames(frames), frames)
    if fbank is not None and drop_audio.any():
        fbank = torch.where(drop_audio[..., None, None], data.remove_audio(fbank), fbank)
    return frames, fbank


class FeatureCache:
    """MoLT never changes the backbones, so their states are computed once: per segment, the pooled features and the
    chosen layers' hidden states (in memory, or for real AVE an fp16 file under out_dir); plus the states of a
    removed frame and of silence, for modality dropout."""

    def __init__(self, model, ds, device, path=None, batch_size=32):
        self.states, pos, n = {}, 0, len(ds) * 10
        for frames, fbank, _ in torch.utils.data.DataLoader(ds, batch_size, generator=torch.Generator()):
            states = model.frozen_states(*to_device(model, frames, fbank, device))
            if not self.states:
                self.states = self.allocate(states, n, path)
            for m, st in states.items():
                for store, s in zip(self.states[m], st):
                    if s is not None:
                        store[pos:pos + len(s)] = s.cpu()
            pos += len(frames) * 10
        frames, fbank, _ = ds[0]
        every = torch.ones(1, 10, dtype=torch.bool)
        blank = model.frozen_states(*to_device(model, *remove(frames[None], fbank[None], every, every), device))
        self.removed = {m: [None if s is None else s[:1].cpu() for s in blank[m]] for m in blank}

    @staticmethod
    def allocate(states, n, path):
        """Float32 tensors in memory, or fp16 tensors mapped onto .npy files after checking the free disk."""
        shapes = {(m, j): (n, *s.shape[1:]) for m, st in states.items() for j, s in enumerate(st) if s is not None}
        if path is None:
            store = {k: torch.empty(shape) for k, shape in shapes.items()}
        else:
            need = sum(2 * math.prod(shape) for shape in shapes.values())
            free = shutil.disk_usage(os.path.dirname(path) or ".").free
            if need > 0.9 * free:
                sys.exit(f"the feature cache needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB are free in "
                         f"{os.path.dirname(path)}: free some space or run with --cache_features=false")
            log(f"feature cache: {need / 1e9:.2f} GB in {path}_*.npy")
            store = {(m, j): torch.from_numpy(np.lib.format.open_memmap(f"{path}_{m}{j}.npy", "w+", np.float16, shape))
                     for (m, j), shape in shapes.items()}
        return {m: [store.get((m, j)) for j in range(2)] for m in states}

    def get(self, idx, removed):
        """States of clips idx (B,) with segments replaced where removed[m] (B, S) is true -> {m: (pooled, late)}."""
        seg = (idx[:, None] * 10 + torch.arange(10)).flatten()  # (B*S,)
        out = {}
        for m, (pooled, late) in self.states.items():
            drop = removed[m].flatten().to(pooled.device)
            pick = [None if s is None else s[seg].float() for s in (pooled, late)]
            out[m] = tuple(None if s is None else torch.where(drop.view(-1, *[1] * (s.dim() - 1)), r, s)
                           for s, r in zip(pick, self.removed[m]))
        return out


def to_device(model, frames, fbank, device):
    """The inputs this model reads, on its device (None for a modality it does not have)."""
    return (frames.to(device) if "v" in model.mods else None), (fbank.to(device) if "a" in model.mods else None)


# ----------------------------------------------------------------------------- training and evaluation


def run_batch(model, batch, device, cache=None, drop="none", p_drop=0.0):
    """One forward pass. drop: "audio"/"frames" removes that modality everywhere; p_drop removes per segment."""
    frames, fbank, labels, idx = batch
    B, S = labels.shape
    drop_a = torch.full((B, S), drop == "audio")
    drop_v = torch.full((B, S), drop == "frames")
    if p_drop > 0:  # modality dropout: never both modalities of one segment
        u = torch.rand(B, S)
        drop_a, drop_v = drop_a | (u < p_drop), drop_v | ((u >= p_drop) & (u < 2 * p_drop))
    if cache is not None:
        states = cache.get(idx, {"a": drop_a, "v": drop_v})
        states = {m: tuple(None if s is None else s.to(device) for s in st) for m, st in states.items()}
        logits, aux = model(None, None, states=states, clips=(B, S))
    else:
        frames, fbank = remove(frames, fbank, drop_frames=drop_v, drop_audio=drop_a)
        logits, aux = model(*to_device(model, frames, fbank, device))
    return logits, aux, labels.to(device)


@torch.no_grad()
def evaluate(model, loader, device, cache=None, drop="none"):
    """Segment accuracy, router weights (mean, and how often each expert is the largest), MoLT's layer weights and
    token redundancy (the orthogonality loss: mean squared cosine between different layer-wise tokens)."""
    model.eval()
    correct = total = orth = 0
    router, alpha = {}, {}
    for batch in loader:
        logits, aux, labels = run_batch(model, batch, device, cache, drop)
        correct += (logits.argmax(-1) == labels).sum().item()
        total += labels.numel()
        orth += aux["orth"].item() * labels.numel() / len(model.mods)
        for m, w in aux["router"].items():  # (B*S, positions, experts)
            top = F.one_hot(w.argmax(-1), w.shape[-1]).float()
            r = router.setdefault(m, [0, 0])
            r[0], r[1] = r[0] + w.sum(0).cpu(), r[1] + top.sum(0).cpu()
        for m, a in aux["alpha"].items():
            alpha[m] = alpha.get(m, 0) + a.sum(0).cpu()
    return {"acc": correct / total, "orth": orth / total,
            "router": {m: {"mean": (r[0] / total).tolist(), "top1": (r[1] / total).tolist()} for m, r in router.items()},
            "alpha": {m: (a / total).tolist() for m, a in alpha.items()}}


def save_checkpoint(path, state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write never corrupts the last good checkpoint


def trainable_state(model):
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def router_table(report, names):
    """Rows: modality x position; columns: experts (CMA first, then UA)."""
    lines = []
    for m, r in report.items():
        for p, (mean, top) in enumerate(zip(r["mean"], r["top1"])):
            lines.append(f"  {names.get(m, m)} {p:>2}  mean " + " ".join(f"{x:.2f}" for x in mean) +
                         "   top-1 " + " ".join(f"{x:.2f}" for x in top))
    return "\n".join(lines)


def write_heatmap(path, reports):
    """Router mean weights as a grey-scale PNG: one block per (report, modality), rows = positions, cols = experts."""
    blocks = [torch.tensor(r["mean"]) for rep in reports for r in rep.values()]
    if not blocks:
        return
    rows = max(b.shape[0] for b in blocks)
    img = torch.ones(rows, sum(b.shape[1] + 1 for b in blocks))
    col = 0
    for b in blocks:
        img[:b.shape[0], col:col + b.shape[1]] = b
        col += b.shape[1] + 1
    img = (img * 255).byte().repeat_interleave(24, 0).repeat_interleave(24, 1)
    torchvision.io.write_png(img[None], path)


def main(cfg):
    t_start = time.time()
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cfg.device == "cuda" and WORLD > 1 else cfg.device
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)
    if WORLD > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out_dir, exist_ok=True)

    sets, num_classes = datasets(cfg)
    cfg.num_classes = num_classes
    vit, ast = backbones(cfg)
    torch.manual_seed(cfg.seed)
    model = AVModel(cfg, vit, ast).to(device)
    counts = param_counts(model)
    log(f"{cfg.mode} ({cfg.modalities}): trainable {counts['adapters']:,} adapter + {counts['head']:,} head "
        f"parameters of {counts['total']:,} in all")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, cfg.lr_step, gamma=0.35)

    caching = cfg.cache_features and cfg.mode != "avmoe"
    t0 = time.time()
    caches = {s: FeatureCache(model, sets[s], device, None if cfg.data == "synthetic" else
                              os.path.join(cfg.out_dir, f"features_rank{RANK}_{s}"))
              if caching and (s == "train" or RANK == 0) else None for s in sets}  # only rank 0 evaluates
    if caching:
        log(f"cached the frozen backbone states of {sum(len(s) for s in sets.values())} clips in {time.time() - t0:.0f} s")
    train = Indexed(sets["train"], inputs=not caching)
    sampler = torch.utils.data.DistributedSampler(train, seed=cfg.seed) if WORLD > 1 else None
    loaders = {s: torch.utils.data.DataLoader(Indexed(sets[s], inputs=not caching), 2 * cfg.batch_size,
                                              generator=torch.Generator())  # own RNG: evaluating draws no random number
               for s in ("val", "test")}

    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    start, best_val, best = 0, -1.0, trainable_state(model)
    if cfg.resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        diff = {k: (v, getattr(cfg, k)) for k, v in ck["config"].items()
                if k not in RESUME_MAY_DIFFER and getattr(cfg, k, None) != v}
        if diff:
            sys.exit(f"{ckpt_path} is from another configuration: " +
                     ", ".join(f"{k}={a!r} there, {b!r} now" for k, (a, b) in diff.items()) +
                     " (only epochs, out_dir and device may change on --resume)")
        if set(ck["model"]) != {n for n, p in model.named_parameters() if p.requires_grad}:
            sys.exit(f"{ckpt_path} holds other trainable tensors than this model: was it written by another version?")
        model.load_state_dict(ck["model"], strict=False)  # the trainable part only; the backbones come from stage 0
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start, best_val, best = ck["epoch"], ck["best_val"], ck["best"]
        torch.set_rng_state(ck["rng"])
        if "cuda_rng" in ck and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["cuda_rng"])
        log(f"resumed from {ckpt_path} after epoch {start}")
    elif cfg.resume:
        log(f"--resume: no {ckpt_path} yet, starting from scratch")

    log_path, epoch_seconds = os.path.join(cfg.out_dir, "log.csv"), []
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        model.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)  # the same order after a resume
        loader = torch.utils.data.DataLoader(train, cfg.batch_size, sampler=sampler, shuffle=sampler is None,
                                             generator=g)
        total_loss = steps = 0
        for step, batch in enumerate(loader):
            logits, aux, labels = run_batch(model, batch, device, caches["train"], p_drop=cfg.modality_dropout)
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten()) + cfg.lambda_orth * aux["orth"] + \
                cfg.lambda_balance * aux["balance"]
            if not torch.isfinite(loss):
                print(f"[rank {RANK}] loss is {loss.item()} at epoch {epoch + 1} step {step}: stopping; {ckpt_path} "
                      "still holds the last good epoch (try a lower --lr)", flush=True)
                sys.exit(1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if WORLD > 1:  # average the gradients over the processes
                for p in params:
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= WORLD
            opt.step()
            total_loss, steps = total_loss + loss.item(), steps + 1
            if RANK == 0 and sys.stdout.isatty():
                print(f"\r  epoch {epoch + 1}: step {step + 1}/{len(loader)} loss {loss.item():.3f}", end="", flush=True)
        sched.step()
        if RANK == 0:
            val_acc = evaluate(model, loaders["val"], device, caches["val"])["acc"]
            if val_acc > best_val:  # model selection on val, never on test
                best_val, best = val_acc, trainable_state(model)
            secs = time.time() - t0
            epoch_seconds.append(round(secs, 2))
            print(f"\repoch {epoch + 1}/{cfg.epochs}: loss {total_loss / steps:.3f}  val acc {val_acc:.3f}  "
                  f"{secs:.1f} s  ETA {secs * (cfg.epochs - epoch - 1):.0f} s", flush=True)
            with open(log_path, "a", newline="") as f:
                csv.writer(f).writerow([cfg.mode, cfg.modalities, epoch + 1, round(total_loss / steps, 4),
                                        round(val_acc, 4)])
            save_checkpoint(ckpt_path, {"model": trainable_state(model), "optimizer": opt.state_dict(),
                                        "scheduler": sched.state_dict(), "epoch": epoch + 1, "best_val": best_val,
                                        "best": best, "rng": torch.get_rng_state(),
                                        **({"cuda_rng": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}),
                                        "config": dataclasses.asdict(cfg)})

    if RANK == 0:
        model.load_state_dict(best, strict=False)
        test = evaluate(model, loaders["test"], device, caches["test"])
        visual = evaluate(model, loaders["test"], device, caches["test"], drop="audio")
        audio = evaluate(model, loaders["test"], device, caches["test"], drop="frames")
        test_acc, visual_only, audio_only = test["acc"], visual["acc"], audio["acc"]
        router, router_v, alpha = test["router"], visual["router"], test["alpha"]
        metrics = {"test_acc": test_acc, "val_acc": best_val, "test_acc_visual_only": visual_only,
                   "test_acc_audio_only": audio_only, "trainable_params": counts["adapters"] + counts["head"],
                   "trainable_adapter_params": counts["adapters"], "head_params": counts["head"],
                   "total_params": counts["total"], "seconds": round(time.time() - t_start, 1), "mode": cfg.mode,
                   "modalities": cfg.modalities, "router_weights": {"normal": router, "visual_only": router_v},
                   "layer_weights": alpha, "token_redundancy": test["orth"], "epoch_seconds": epoch_seconds,
                   "config": dataclasses.asdict(cfg)}
        print(f"test acc {test_acc:.3f} (val {best_val:.3f}); audio removed {visual_only:.3f}; "
              f"frames removed {audio_only:.3f}")
        names = {"a": "audio ", "v": "visual"}
        if router:
            print("router weights per position (CMA experts first, then UA), normal input:\n" + router_table(router, names))
            print("visual-only input (audio removed):\n" + router_table(router_v, names))
            write_heatmap(os.path.join(cfg.out_dir, "router.png"), [router, router_v])
        if alpha:
            print(f"MoLT token redundancy (mean squared cosine between layer-wise tokens): {test['orth']:.3f}")
        for m, a in alpha.items():
            print(f"MoLT layer significance ({names[m].strip()}, {cfg.molt_layers} {len(a)} layers): " + " ".join(f"{x:.2f}" for x in a))
        with open(os.path.join(cfg.out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        print(f"wrote {cfg.out_dir}/metrics.json in {metrics['seconds']:.0f} s")
    if WORLD > 1:
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- --bench: the cost of each method


def measure(model, batch, device, steps):
    """Trainable adapter parameters, bytes autograd saves for backward in one training step (each storage once,
    parameters left out: expanded views of frozen weights would otherwise count a hundredfold), median step time."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times = []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 1):  # the first step is warm-up
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if i == 0 else contextlib.nullcontext():
            logits, aux, labels = run_batch(model, batch, device)
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten()) + aux["orth"] + aux["balance"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {"adapter_params": param_counts(model)["adapters"], "saved_bytes": sum(saved.values()),
           "step_seconds": sorted(times[1:])[len(times[1:]) // 2]}
    if device.startswith("cuda"):
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


def bench(cfg, paper_scale=True):
    """AVMoE vs MoLT on the same backbones, batch and widths; then the same counts at the papers' scale."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sets, cfg.num_classes = datasets(cfg)
    vit, ast = backbones(cfg)
    batch = next(iter(torch.utils.data.DataLoader(Indexed(sets["train"]), batch_size=cfg.batch_size)))
    results, scales = {}, {"demo": (vit, ast, batch, 5, cfg.reduction)}
    if paper_scale:  # ViT-B/16 at 192 px and AST-base on a 1 s segment, random weights, one clip of 2 segments
        torch.manual_seed(cfg.seed)
        g = torch.Generator().manual_seed(0)
        big_batch = (torch.randn(1, 2, 3, 192, 192, generator=g), torch.randn(1, 2, 100, 128, generator=g),
                     torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long))
        scales["paper scale"] = (ViT(192, 16, 768, 12, 12, 3072), AST(128, 100, 10, 10, 768, 12, 12, 3072),
                                 big_batch, 2, 8)
    for scale, (v, a, b, steps, r) in scales.items():
        for mode in ("avmoe", "molt"):  # the papers' bottleneck is D/8
            model = AVModel(dataclasses.replace(cfg, mode=mode, reduction=r), v, a).to(device)
            results[f"{scale} {mode}"] = measure(model, b, device, steps)
    print(f"{'':24}{'adapter params':>16}{'saved for backward':>20}{'step time':>12}")
    about = {"demo": f"{cfg.batch_size} clips x 10 segments", "paper scale": "1 clip x 2 segments, D/8 bottleneck"}
    for scale in scales:
        rows = [results[f"{scale} avmoe"], results[f"{scale} molt"]]
        for mode, r in zip(("AVMoE", "MoLT"), rows):
            print(f"{scale + ' ' + mode:24}{r['adapter_params']:>16,}{r['saved_bytes'] / 1e6:>17.1f} MB"
                  f"{r['step_seconds']:>11.3f}s")
        ratio = {k: rows[1][k] / rows[0][k] for k in ("adapter_params", "saved_bytes", "step_seconds")}
        results[f"{scale} molt / avmoe"] = ratio
        print(f"{scale + ' MoLT / AVMoE':24}{ratio['adapter_params']:>16.3f}{ratio['saved_bytes']:>20.3f}"
              f"{ratio['step_seconds']:>12.3f}   ({about[scale]})")
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "bench.json"), "w") as f:
        json.dump(results, f, indent=1)


RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

if __name__ == "__main__":
    if "--bench" in sys.argv:
        bench(parse_config([a for a in sys.argv[1:] if a != "--bench"]))
    else:
        main(parse_config(sys.argv[1:]))
