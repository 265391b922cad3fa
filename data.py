"""Data: the AST fbank, the synthetic AVE default and the real AVE pipeline.

    python data.py --prepare_ave ROOT --out DIR  decode the real AVE videos once (needs the ffmpeg
                                                 CLI)
"""
import argparse
import contextlib
import functools
import glob
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio

# AudioSet statistics used by the released AST checkpoints (AST repo, HF ASTFeatureExtractor).
FBANK_MEAN, FBANK_STD = -4.2677393, 4.5689974
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SAMPLE_RATE, SECONDS = 16000, 10  # AVE clips are 10 s, labelled per 1 s segment
# fbank frames per 1 s segment: 98, zero-padded to 100 (9 time patches at tstride 10)
FRAMES_PER_SEGMENT = 100


def fbank(wave, sample_rate=16000, num_mel_bins=128, target_length=1024):
    """Waveform (samples,) or (channels, samples) in [-1, 1] -> normalised log-mel fbank
    (target_length, num_mel_bins), AST recipe. Channels are averaged to mono, as ffmpeg's -ac 1 does
    in preparation."""
    wave = torch.as_tensor(wave, dtype=torch.float32)
    # a (samples, channels) array is refused
    if wave.dim() not in (1, 2) or (wave.dim() == 2 and wave.shape[0] > wave.shape[1]):
        raise ValueError("fbank expects a waveform (samples,) or (channels, samples), got shape "
                         f"{tuple(wave.shape)}")
    wave = wave.mean(0) if wave.dim() == 2 else wave
    if sample_rate != 16000:
        wave = torchaudio.functional.resample(wave, sample_rate, 16000)
    if wave.numel() < 400:  # kaldi.fbank asserts on less than one 25 ms window
        wave = F.pad(wave, (0, 400 - wave.numel()))
    wave = wave - wave.mean()
    fb = torchaudio.compliance.kaldi.fbank(  # (frames, mels)
        wave[None], htk_compat=True, sample_frequency=16000, use_energy=False,
        window_type="hanning", num_mel_bins=num_mel_bins, dither=0.0, frame_shift=10)
    pad = target_length - fb.shape[0]
    fb = F.pad(fb, (0, 0, 0, pad)) if pad > 0 else fb[:target_length]
    return (fb - FBANK_MEAN) / (FBANK_STD * 2)


def imagenet_normalise(x, undo=False):
    """Images (..., 3, H, W) in [0, 1] -> ImageNet-normalised, as the ViT expects; undo=True: the
    way back."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]  # (3, 1, 1)
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return x * std + mean if undo else (x - mean) / std


# ---- Synthetic AVE (the README's "The synthetic AVE" says why it is built so) ----
# An event counts only when it is both heard and seen; each clip also holds an audible-only and a
# visible-only decoy run, roles assigned after placement, so one modality cannot tell the event from
# its decoy. Class c is a shape (seen) and a timbre (heard), concepts stage 0 teaches at any hue,
# place, scale and pitch (nuisance, read off by a patch embedding); every second also shows and
# plays a distractor of a kind no class has.

CLASS_SHAPES = ("square", "disk", "ring", "cross", "triangle", "bar")
CLASS_TIMBRES = ("sine", "odd", "rich", "tremolo", "vibrato", "pulse")
# the last two only as distractors; stage 0 learns all of them
SHAPES = CLASS_SHAPES + ("diamond", "frame")
TIMBRES = CLASS_TIMBRES + ("chirp", "bell")
RUN_LENGTHS = (2, 3, 4)
HARMONICS = {"sine": [1], "odd": [1, 3, 5], "rich": [1, 2, 3, 4, 5, 6], "pulse": [1, 2, 3],
             "bell": [1, 2.76, 5.4]}


def shape_mask(shape, dy, dx, r):
    """Pixels of a shape of radius r, from each pixel's offset (dy, dx) to the centre."""
    box, d = np.maximum(abs(dx), abs(dy)), np.hypot(dy, dx)
    return {"square": lambda: box < r * 0.8, "disk": lambda: d < r,
            "ring": lambda: (d < r) & (d > r * 0.55),
            "cross": lambda: ((abs(dx) < r / 3) & (abs(dy) < r))
            | ((abs(dy) < r / 3) & (abs(dx) < r)),
            "triangle": lambda: (dy < r * 0.8) & (abs(dx) < (dy + r) / 2),
            "bar": lambda: (abs(dx) < r) & (abs(dy) < r / 3),
            "diamond": lambda: abs(dx) + abs(dy) < r,
            "frame": lambda: (box < r * 0.8) & (box > r * 0.45)}[shape]()


def draw_frame(rng, size, shapes):
    """uint8 (size, size, 3): a noisy grey background and the shapes in random hues, places and
    scales."""
    img = rng.normal(0.45, 0.1, (size, size, 1)) + rng.normal(0, 0.05, (size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    for shape in shapes:
        r = rng.uniform(0.15, 0.3) * size
        cy, cx = rng.uniform(r, size - r, 2)
        mask = shape_mask(shape, yy - cy, xx - cx, r)
        # a random hue
        rgb = np.clip(np.abs(rng.random() * 6 - np.array([3, 2, 4])) * [1, -1, -1] + [-1, 2, 2],
                      0, 1)
        img[mask] = rgb * rng.uniform(0.7, 1.0) * rng.uniform(0.85, 1.0, (mask.sum(), 1))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def draw_sound(rng, timbres):
    """float32 (16000,) in [-1, 1]: 1 s of noise plus the timbres at random pitches (150 Hz ..
    3 kHz) and loudness."""
    t = np.arange(SAMPLE_RATE, dtype=np.float32) / SAMPLE_RATE
    wave = rng.normal(0, rng.uniform(0.005, 0.03), SAMPLE_RATE).astype(np.float32)
    for timbre in timbres:
        f0 = 150 * 20 ** rng.random()
        # a chirp rises an octave: f0 (1 + t)
        phase = 2 * np.pi * f0 * {"chirp": t + 0.5 * t * t}.get(timbre, t)
        if timbre == "vibrato":
            phase = phase + 0.03 * f0 / 5 * np.sin(2 * np.pi * 5 * t)
        ks = np.array([k for k in HARMONICS.get(timbre, [1, 2]) if k * f0 < SAMPLE_RATE / 2],
                      np.float32)
        # float32: the sines cost the most
        start = rng.uniform(0, 2 * np.pi, (len(ks), 1)).astype(np.float32)
        tone = (np.sin(ks[:, None] * phase + start) / ks[:, None]).sum(0)  # (16000,)
        env = {"tremolo": 0.5 + 0.5 * np.sin(2 * np.pi * 6 * t),
               "pulse": np.sin(2 * np.pi * 3 * t) > 0,
               "bell": np.exp(-4 * t)}.get(timbre, 1)
        wave = wave + rng.uniform(0.05, 0.2) * tone * env
    return np.clip(wave, -1, 1).astype(np.float32)


def make_clip(rng, num_classes):
    """-> audible class per segment (-1: none), visible class (-1: none), labels (background = C),
    run id (0 event, 1 audible-only decoy, 2 visible-only decoy, -1 none)."""
    while True:
        lengths = rng.choice(RUN_LENGTHS, 3)
        if lengths.sum() <= SECONDS:
            break
    # free segments before, between, after the runs
    gaps = rng.multinomial(SECONDS - lengths.sum(), np.ones(4) / 4)
    starts = np.cumsum(np.r_[gaps[0], lengths[:-1] + gaps[1:3]])
    c = rng.integers(num_classes)
    decoy = [c if rng.random() < 0.5 else rng.integers(num_classes) for _ in range(2)]
    audible, visible, run = -np.ones(SECONDS, int), -np.ones(SECONDS, int), -np.ones(SECONDS, int)
    # roles assigned after placement
    for start, n, role in zip(starts, lengths, rng.permutation(3)):
        run[start:start + n] = role
        if role in (0, 1):
            audible[start:start + n] = c if role == 0 else decoy[0]
        if role in (0, 2):
            visible[start:start + n] = c if role == 0 else decoy[1]
    return audible, visible, np.where(run == 0, c, num_classes), run


def segment(rng, shapes, timbres, image_size, num_mel_bins):
    """One second: a frame showing the shapes and the fbank of a sound playing the timbres."""
    fb = fbank(draw_sound(rng, timbres), num_mel_bins=num_mel_bins,
               target_length=FRAMES_PER_SEGMENT)
    return draw_frame(rng, image_size, shapes), fb


def render_clip(seed, i, num_classes, image_size, num_mel_bins):
    """Clip i of a split, from its own random stream (so that clips can be drawn in parallel): the
    generator's record (audible, visible, labels, run), frames uint8 (10, H, W, 3) and fbank
    float16 (10, 100, F)."""
    rng = np.random.default_rng([seed, i])
    record = make_clip(rng, num_classes)
    segs = []
    for a, v in zip(record[0], record[1]):
        # the distractor, then what is seen
        shapes = [SHAPES[rng.integers(len(CLASS_SHAPES), len(SHAPES))]]
        timbres = [TIMBRES[rng.integers(len(CLASS_TIMBRES), len(TIMBRES))]]
        shapes += [CLASS_SHAPES[v]] if v >= 0 else []
        timbres += [CLASS_TIMBRES[a]] if a >= 0 else []
        segs.append(segment(rng, shapes, timbres, image_size, num_mel_bins))
    return (*record, np.stack([f for f, _ in segs]),
            torch.stack([b for _, b in segs]).half().numpy())


def render_pretraining(seed, i, image_size, num_mel_bins):
    """Stage-0 sample i: a frame labelled by its shape, a sound by its timbre, at any hue, place,
    scale and pitch (the last label: nothing there); classes and distractors alike, as ImageNet's
    classes outnumber AVE's."""
    rng = np.random.default_rng([seed, i])
    shape, timbre = rng.integers(len(SHAPES) + 1), rng.integers(len(TIMBRES) + 1)
    frame, fb = segment(rng, SHAPES[shape:shape + 1], TIMBRES[timbre:timbre + 1], image_size,
                        num_mel_bins)
    return frame, fb.half().numpy(), shape, timbre


def draw_all(job, args, workers, what):
    """[job(*a) for a in args] in processes of one torch thread each: the small fbank calls gain
    nothing from more."""
    progress = Progress(what, len(args))
    if workers == 1:
        with single_thread():
            return [progress(job(*a)) for a in args]
    # A Pool, whose exit (Ctrl-C, SIGTERM) terminates the workers at once: none outlives the run.
    with multiprocessing.get_context("spawn").Pool(workers, quiet_worker) as pool:
        return [progress(c) for c in pool.imap(functools.partial(call, job), args, chunksize=16)]


def quiet_worker():
    """A drawing process: one torch thread; Ctrl-C is the main process's to handle."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def call(job, args):
    return job(*args)


def generate(sizes, seed, num_classes, image_size, num_mel_bins, workers=1):
    """Deterministic synthetic splits {name: n clips} -> {name: uint8 frames (n,10,H,W,3), fbank
    (n,10,100,F) and the generator's record}, drawn in one pool (starting worker processes costs
    seconds)."""
    job = functools.partial(render_clip, num_classes=num_classes, image_size=image_size,
                            num_mel_bins=num_mel_bins)
    # a stream per clip
    args = [(seed * 1000 + k, i) for k, n in enumerate(sizes.values()) for i in range(n)]
    clips = draw_all(job, args, workers, f"synthetic AVE: drawing {len(args)} clips")
    keys, splits, start = ("audible", "visible", "labels", "run", "frames", "fbank"), {}, 0
    for name, n in sizes.items():
        # (n, 10, ...)
        splits[name] = {k: torch.from_numpy(np.stack([c[j] for c in clips[start:start + n]]))
                        for j, k in enumerate(keys)}
        start += n
    return splits


def generate_pretraining(seed, n, image_size, num_mel_bins, workers=1):
    """Stage 0 data: normalised frames (n, 3, H, W) labelled by shape, fbanks (n, 100, F) labelled
    by timbre."""
    job = functools.partial(render_pretraining, image_size=image_size, num_mel_bins=num_mel_bins)
    samples = draw_all(job, [(seed, i) for i in range(n)], workers,
                       f"stage 0: drawing {n} images and sounds")
    frames, fbanks, shape, timbre = zip(*samples)
    frames = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255
    return (imagenet_normalise(frames), torch.from_numpy(np.stack(fbanks)).float(),
            torch.tensor(shape), torch.tensor(timbre))


def unimodal_ceiling(split, modality):
    """Best segment accuracy from one modality, from the generator's record: a segment it perceives
    nothing in is background; one in a perceived run is the event with probability 1/k, k the clip's
    perceived runs (exchangeable by construction), so the best guess is right max(1/k, 1-1/k)."""
    seen = split["audible" if modality == "a" else "visible"] >= 0  # (N, 10)
    run = torch.where(seen, split["run"], -1)
    # (N, 1)
    k = torch.tensor([len(set(r.tolist()) - {-1}) for r in run]).clamp_min(1)[:, None].float()
    return torch.where(seen, torch.maximum(1 / k, 1 - 1 / k), torch.ones_like(k)).mean().item()


@dataclass
class SynthConfig:
    """The synthetic AVE's settings (train.Config extends them)."""
    num_classes: int = 6  # event classes (at most 6 synthetic ones); background is one more
    image_size: int = 32  # frame side in pixels (a multiple of the ViT's patch, 8 for stage 0)
    num_mel_bins: int = 64  # fbank mel bins (at least the AST's patch, 16)
    train_clips: int = 1000  # synthetic split sizes, in 10 s clips
    val_clips: int = 200  # model selection
    test_clips: int = 300  # the reported numbers
    seed: int = 0  # data, stage 0 and training


GENERATOR = "v4"  # part of the cache key: bump it when the generator changes what it draws


def synthetic_splits(cfg, cache_dir, workers=2):
    """train/val/test splits from cfg's seed and sizes, generated once and cached in cache_dir."""
    sizes = {"train": cfg.train_clips, "val": cfg.val_clips, "test": cfg.test_clips}
    key = f"synthetic_{GENERATOR}_s{cfg.seed}_c{cfg.num_classes}_{cfg.image_size}px_" \
          f"{cfg.num_mel_bins}mel_{'-'.join(map(str, sizes.values()))}.pt"
    path = os.path.join(cache_dir, key)
    if os.path.exists(path):
        try:
            return torch.load(path, weights_only=True)
        except Exception as e:  # truncated or empty: a killed copy, a full disk
            raise ValueError(f"the data cache file {path} is broken ({type(e).__name__}): delete "
                             "it and rerun") from None
    splits = generate(sizes, cfg.seed, cfg.num_classes, cfg.image_size, cfg.num_mel_bins, workers)
    os.makedirs(cache_dir, exist_ok=True)
    write_atomic(path, splits)
    return splits


class SyntheticAVE(torch.utils.data.Dataset):
    """Items like the real AVE: (frames (10,3,H,W) normalised, fbank (10,100,F), labels (10,))."""

    def __init__(self, split, num_classes):
        self.split, self.labels = split, split["labels"]
        self.class_names = [f"{s} + {t}" for s, t in zip(CLASS_SHAPES, CLASS_TIMBRES)][:num_classes]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        frames = self.split["frames"][i].permute(0, 3, 1, 2).float() / 255  # (10, 3, H, W)
        return imagenet_normalise(frames), self.split["fbank"][i].float(), self.split["labels"][i]


# ---- Real AVE: ROOT holds Annotations.txt, {train,val,test}Set.txt and AVE/<VideoID>.mp4 ----
# `python data.py --prepare_ave ROOT --out DIR` decodes every clip once with the ffmpeg CLI into
# DIR/<VideoID>.npz (torchvision/torchaudio can no longer decode video here); AVEDataset then reads
# only those files.


# A row of an annotation file; start: the first labelled second, end: one past the last
AVERow = namedtuple("AVERow", "category video_id quality start end")


def read_annotations(path):
    """Rows of an AVE annotation/split file (UTF-8, a BOM is dropped):
    `Category&VideoID&Quality&StartTime&EndTime`, optional header."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: the AVE folder must hold Annotations.txt, "
                                "{train,val,test}Set.txt and AVE/")
    with open(path, "rb") as f:
        raw = f.read()
    start = raw.find(b"\0")  # UTF-16 without a BOM: a NUL beside each ASCII letter
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:  # Latin-1 or UTF-16, say
        start = e.start if start < 0 else min(start, e.start)
    if start >= 0:  # name the line, not a byte offset
        line = raw[:start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not UTF-8: save the file as UTF-8")
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows, alike = [], {}
    for k, (n, line) in enumerate(lines):
        fields = [x.strip() for x in line.split("&")]
        times = [int(x) if x.isascii() and x.isdigit() else None for x in fields[3:]]
        if k == 0 and len(fields) == 5 and times == [None, None]:
            continue  # the header line Category&VideoID&Quality&StartTime&EndTime
        if len(fields) != 5 or not all(fields[:2]) or None in times \
                or not 0 <= times[0] <= times[1] <= SECONDS:
            raise ValueError(f"{path}, line {n}: expected Category&VideoID&Quality&StartTime&"
                             f"EndTime with integer times 0 <= start <= end <= {SECONDS}, got "
                             f"{line!r}")
        rows.append(AVERow(*fields[:3], *times))
        alike.setdefault(" ".join(fields[0].casefold().split()), {}).setdefault(fields[0], n)
    for names in alike.values():  # names alike but for case or spaces: separate classes otherwise
        if len(names) > 1:
            named = ", ".join(f"{c!r} (line {n})" for c, n in names.items())
            raise ValueError(f"{path}: the class names {named} differ only in case or spaces: "
                             "spell each class one way")
    return rows


def class_map(path):
    """Category -> index, in order of first appearance in Annotations.txt (Church bell = 0 ...
    Mandolin = 27)."""
    return {c: i for i, c in enumerate(dict.fromkeys(r.category for r in read_annotations(path)))}


def segment_labels(row, classes):
    """(10,) int64: segment t is the row's class when start <= t < end, else background =
    len(classes)."""
    if row.category not in classes:
        raise ValueError(f"category {row.category!r} of video {row.video_id} is not in "
                         "Annotations.txt: use the split files that came with it")
    t = torch.arange(SECONDS)
    return torch.where((row.start <= t) & (t < row.end), classes[row.category], len(classes))


RUNNING = set()  # the ffmpeg processes of prepare_ave's threads: killed when it is interrupted


def _run(cmd, timeout):
    """stdout of a ffmpeg/ffprobe command; RuntimeError with ffmpeg's own last message if it fails
    or hangs."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
        RUNNING.add(p)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            raise RuntimeError(f"{cmd[0]} timed out after {timeout} s") from None
        finally:
            RUNNING.discard(p)
    if p.returncode:
        msg = err.decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"{cmd[0]} failed: {msg[-1] if msg else f'exit code {p.returncode}'}")
    return out


def prepare_video(src, dst, image_size=224, timeout=120):
    """Decode one clip into dst (.npz with frames (10,S,S,3) uint8 and audio (160000,) float32);
    returns the notes that apply ("padded", "silent"); raises if the clip is unusable."""
    if not os.path.isfile(src):
        other = glob.glob(glob.escape(os.path.splitext(src)[0]) + ".*")  # only .mp4 is read
        raise RuntimeError(f"file missing: {src}" + (f" (found {' '.join(other)}: convert it "
                           f"with `ffmpeg -i {other[0]} {src}`)" if other else ""))
    kinds = _run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_type", "-of", "csv=p=0",
                  src], timeout).decode().split()
    if "video" not in kinds:
        raise RuntimeError("no video stream")
    # One frame per second, from its middle: setpts moves t = n + 0.5 to n, where the 1 fps sampler
    # ticks, and round=up makes each tick take the last frame at or before it. Then a plain resize
    # of the whole frame to S x S (no crop), as the official pipelines do.
    decode = ["ffmpeg", "-nostdin", "-v", "error", "-i", src]
    raw = _run([*decode, "-map", "0:v:0", "-vf",
                f"setpts=PTS-0.5/TB,fps=1:round=up,scale={image_size}:{image_size}:flags=bicubic",
                "-frames:v", str(SECONDS), "-pix_fmt", "rgb24", "-f", "rawvideo", "-"], timeout)
    frames = np.frombuffer(raw, np.uint8).reshape(-1, image_size, image_size, 3)
    if len(frames) == 0:
        raise RuntimeError("no video frame")
    # The length from what is decoded, not from the header (a raw H.264 stream has none): two
    # frames mean 1.5 s; with one, a frame from 0.96 s on (a 1 s clip's last at 25 fps) must come.
    if len(frames) == 1 and not _run([*decode, "-vf", "trim=0.96", "-f", "rawvideo", "-"], timeout):
        raise RuntimeError("shorter than 1 s")
    has_audio = "audio" in kinds
    # ffmpeg downmixes and resamples; -t cuts at 10 s; first_pts=0 keeps the audio on the picture's
    # clock: silence before a late audio stream
    audio = np.frombuffer(_run([*decode, "-map", "0:a:0", "-af", "aresample=first_pts=0",
                                "-ac", "1", "-ar", str(SAMPLE_RATE), "-t", str(SECONDS),
                                "-f", "f32le", "-"], timeout) if has_audio else b"", np.float32)
    n = SAMPLE_RATE * SECONDS
    # AAC often ends a few ms early
    padded = len(frames) < SECONDS or (has_audio and len(audio) < n - SAMPLE_RATE // 2)
    notes = ["padded"] * padded + ["silent"] * (not has_audio)
    # the last frame repeated, the audio zero-padded
    frames = np.concatenate([frames, frames[-1:].repeat(SECONDS - len(frames), 0)])
    audio = np.pad(audio[:n], (0, n - len(audio[:n])))
    # Audio stays float32: exactly what ffmpeg decoded (no int16 rounding, no clipping of peaks
    # above 1); it is 0.6 MB a clip next to 1.5 MB of frames at 224. Written whole, then renamed,
    # through one temporary file per clip, which a rerun replaces after a killed one.
    write_atomic(dst, lambda f: np.savez(f, frames=frames, audio=audio), dst + ".tmp")
    return notes


def check_prepared(path, image_size=None, whole=False):
    """The frames' side of a prepared .npz; ValueError if it is unreadable or holds other keys or
    shapes than prepare_video writes. Cheap: reads the zip directory and the arrays' headers;
    whole=True also checks the data against its CRC-32."""
    expect = {"audio": ((SAMPLE_RATE * SECONDS,), np.float32),
              "frames": ((SECONDS, image_size, image_size, 3), np.uint8)}  # frames last: see return
    try:
        with zipfile.ZipFile(path) as z:
            if sorted(z.namelist()) != ["audio.npy", "frames.npy"]:
                raise ValueError(f"holds {z.namelist()}, not frames.npy and audio.npy")
            for key, (shape, dtype) in expect.items():
                with z.open(key + ".npy") as f:
                    npy = np.lib.format
                    read = {(1, 0): npy.read_array_header_1_0}.get(npy.read_magic(f),
                                                                   npy.read_array_header_2_0)
                    got, _, got_dtype = read(f)
                if got_dtype != dtype or len(got) != len(shape) \
                        or any(a and a != b for a, b in zip(shape, got)):
                    raise ValueError(f"{key} is {got_dtype} {got}, expected {np.dtype(dtype)} "
                                     f"{shape}")
            if whole and (damaged := z.testzip()):  # reads every member once, against its CRC-32
                raise ValueError(f"the data of {damaged} is damaged")
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise ValueError(f"{path} is broken ({e})") from None
    return got[1]  # the frames' side


def earlier_broken(dst, todo, out, image_size, overwrite):
    """The earlier clips that are broken, {video: why} (with overwrite, another size counts as
    broken); ValueError if they were prepared at another size."""
    broken = {}
    for v in sorted(set(dst) - set(todo)):
        try:  # reads the data against its CRC-32
            side = check_prepared(dst[v], image_size if overwrite else None, whole=True)
        except ValueError as e:
            broken[v] = e
            continue
        if side != image_size:  # found on the first file of a folder prepared at one size
            raise ValueError(f"the clips in {out} were prepared at {side} px: pass --image_size "
                             f"{side} to add to them, or --overwrite to redo them")
    return broken


def prepare_ave(root, out, image_size=224, workers=2, overwrite=False, timeout=120):
    """Decode every video of ROOT/Annotations.txt into OUT/<VideoID>.npz; resumable, never stops on
    a bad clip. The flags, tools, annotations and earlier clips (another size is refused) are
    checked before any file is written or removed."""
    for flag, value in (("--image_size", image_size), ("--workers", workers)):
        if value < 1:
            raise ValueError(f"{flag} {value}: it must be at least 1")
    check_folder(out, "--out")
    for tool in ("ffmpeg", "ffprobe"):
        if not shutil.which(tool):
            raise ValueError(f"{tool} not found on PATH: install ffmpeg (Debian/Ubuntu: apt-get "
                             "install -y ffmpeg)")
    videos = os.path.join(root, "AVE")
    if not os.path.isdir(videos):
        raise ValueError(f"{videos} not found: put the videos in ROOT/AVE/<VideoID>.mp4")
    rows = read_annotations(os.path.join(root, "Annotations.txt"))
    dst = {v: os.path.join(out, v + ".npz") for v in dict.fromkeys(r.video_id for r in rows)}
    todo = [v for v in dst if not os.path.exists(dst[v])]
    for v, e in earlier_broken(dst, todo, out, image_size, overwrite).items():
        os.remove(dst[v])  # if preparing it fails again, the row is dropped, not left broken
        print(f"{e}: preparing it again")
        todo.append(v)
    os.makedirs(out, exist_ok=True)
    print(f"{len(dst)} videos, {len(dst) - len(todo)} already in {out}, {len(todo)} to prepare")
    report = dict(prepared=[], skipped={}, padded=[], silent=[])
    progress = Progress("preparing videos", len(todo))
    # the work is in ffmpeg subprocesses: threads run in parallel
    with ThreadPoolExecutor(workers) as pool:
        jobs = {pool.submit(prepare_video, os.path.join(videos, v + ".mp4"), dst[v], image_size,
                            timeout): v for v in todo}
        try:
            for job in as_completed(jobs):
                try:  # the notes are known once the video is done
                    for note in ("prepared", *job.result()):
                        report[note].append(jobs[job])
                except OSError:  # a full disk: stop (the clips written are kept)
                    raise
                except Exception as e:  # a failure (missing, undecodable, timeout) skips the video
                    report["skipped"][jobs[job]] = str(e)
                progress()
        finally:  # on Ctrl-C, drop the queued videos and stop the running ones before exiting
            for p in list(RUNNING):
                p.kill()
            pool.shutdown(cancel_futures=True)
    for v, why in sorted(report["skipped"].items()):
        print(f"skipped {v}: {why}")
    for note, what in [("padded", "shorter than 10 s, padded"),
                       ("silent", "no audio stream, silent audio")]:
        if report[note]:
            print(f"{what} ({len(report[note])}): {' '.join(sorted(report[note]))}")
    print(f"prepared {len(report['prepared'])}, skipped {len(report['skipped'])}, "
          f"{sum(map(os.path.exists, dst.values()))}/{len(dst)} videos now in {out}")
    return report


class AVEDataset(torch.utils.data.Dataset):
    """One example per row of ROOT/{split}Set.txt: (frames (10,3,H,W), fbank (10,100,mels), labels
    (10,))."""

    def __init__(self, prepared_dir, root, split, image_size=None, num_mel_bins=128):
        annotations = os.path.join(root, "Annotations.txt")
        classes = class_map(annotations)
        known = {r.video_id for r in read_annotations(annotations)}
        rows = read_annotations(os.path.join(root, f"{split}Set.txt"))
        unknown = list(dict.fromkeys(r.video_id for r in rows if r.video_id not in known))
        if unknown:  # never prepared: prepare_ave reads Annotations.txt
            print(f"AVE {split}: dropped the rows of {len(unknown)} videos not in Annotations.txt: "
                  f"{' '.join(unknown[:5])}{' ...' * (len(unknown) > 5)}")
        pairs = [(os.path.join(prepared_dir, r.video_id + ".npz"), segment_labels(r, classes))
                 for r in rows if r.video_id in known]
        keep = [(f, y) for f, y in pairs if os.path.exists(f)]
        prepare = f"python data.py --prepare_ave {root} --out {prepared_dir}"
        if not keep:
            raise FileNotFoundError(
                f"{split}Set.txt in {root} lists no video" if not rows else
                f"no prepared clip of the {split} split in {prepared_dir}: run `{prepare}` first")
        if len(keep) < len(pairs):  # listed as skipped when preparing, or still to prepare
            print(f"AVE {split}: dropped {len(pairs) - len(keep)} of {len(pairs)} rows whose video "
                  "was not prepared")
        self.files, self.labels = [f for f, _ in keep], torch.stack([y for _, y in keep])  # (N, 10)
        self.class_names, self.num_classes = list(classes), len(classes)
        self.image_size, self.num_mel_bins = image_size, num_mel_bins
        self.redo = f"rerun `{prepare}`, which redoes broken files"
        # before any training: a broken file would otherwise stop a long run halfway
        for f in self.files:
            try:
                check_prepared(f)
            except ValueError as e:
                raise ValueError(f"{e}: {self.redo}") from None

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            with np.load(self.files[i]) as f:
                frames, audio = torch.from_numpy(f["frames"]), torch.from_numpy(f["audio"])
        # damaged inside: the check in __init__ read the headers only
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(f"{self.files[i]} is broken ({e}): {self.redo}") from None
        x = frames.permute(0, 3, 1, 2).float() / 255  # (10,3,H,W) in [0, 1]
        if self.image_size and self.image_size != x.shape[-1]:
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", antialias=True)
        x = imagenet_normalise(x)
        fb = torch.stack([fbank(seg, num_mel_bins=self.num_mel_bins,
                                target_length=FRAMES_PER_SEGMENT)
                          for seg in audio.view(SECONDS, SAMPLE_RATE)])
        return x, fb, self.labels[i]


# ---- What the model reads: inputs with a modality removed, and the frozen backbone states cached
# once ----


def remove_audio(fb):
    """"Audio removed": every segment (..., T, F) becomes the fbank of a silent (zero) waveform."""
    return fbank(torch.zeros(SAMPLE_RATE), num_mel_bins=fb.shape[-1],
                 target_length=fb.shape[-2]).expand_as(fb)


def remove_frames(frames):
    """"Frames removed": every segment becomes a black frame, normalised like any other."""
    return imagenet_normalise(torch.zeros_like(frames))


def remove_inputs(frames, fbank, removed):
    """Black frames where removed["v"] (B, S) is true, silent audio where removed["a"] is."""
    if frames is not None and removed["v"].any():
        frames = torch.where(removed["v"][..., None, None, None], remove_frames(frames), frames)
    if fbank is not None and removed["a"].any():
        fbank = torch.where(removed["a"][..., None, None], remove_audio(fbank), fbank)
    return frames, fbank


class FeatureCache:
    """The frozen states of every segment, computed once (real AVE: fp16 files), and those of black
    frames, silence."""

    def __init__(self, model, ds, path=None):
        def states(frames, fbank):  # {(m, name): (segments, ...)} on the CPU
            st = model.frozen_states(frames, fbank)
            return {(m, name): s.cpu() for m, named in st.items() for name, s in named.items()}
        frames, fbank, _ = ds[0]
        every = torch.ones(1, SECONDS, dtype=torch.bool)
        removed = remove_inputs(frames[None], fbank[None], {"a": every, "v": every})
        self.removed_states = {k: s[:1] for k, s in states(*removed).items()}
        shapes = {k: (len(ds) * SECONDS, *s.shape[1:]) for k, s in self.removed_states.items()}
        if not path:
            self.states = {k: torch.empty(shape) for k, shape in shapes.items()}
        else:  # fp16 tensors mapped onto .npy files, if the disk has room
            need = sum(2 * math.prod(shape) for shape in shapes.values())
            check_room(os.path.dirname(path) or ".", need / 0.9, "the feature cache needs",
                       "or run with --cache_features=false")
            # each process its own
            print(f"feature cache: {need / 1e9:.2f} GB in {path}_*.npy", flush=True)
            self.states = {}
            for (m, name), shape in shapes.items():
                file = f"{path}_{m}_{name}.npy"
                self.states[m, name] = torch.from_numpy(
                    np.lib.format.open_memmap(file, "w+", np.float16, shape))
                with contextlib.suppress(OSError):  # POSIX: mapped until the process ends
                    os.remove(file)  # never left on disk
        progress = Progress(f"caching the frozen backbone states of {len(ds)} clips", len(ds))
        pos = 0
        for frames, fbank, _ in torch.utils.data.DataLoader(ds, 32, generator=torch.Generator()):
            for k, s in states(frames, fbank).items():
                self.states[k][pos:pos + len(s)] = s
            pos += len(frames) * SECONDS
            progress(n=len(frames))

    def get(self, idx, removed, device):
        """States of clips idx (B,) with segments replaced where removed[m] (B, S) is true ->
        {m: {name: tensor}}."""
        seg = (idx[:, None] * SECONDS + torch.arange(SECONDS)).flatten()  # (B*S,)
        out = {}
        for (m, name), s in self.states.items():
            mask = removed[m].flatten().view(-1, *[1] * (s.dim() - 1))  # (B*S, 1, ...)
            states = torch.where(mask, self.removed_states[m, name], s[seg].float())
            out.setdefault(m, {})[name] = states.to(device)
        return out


# ---- Helpers: progress on one line, atomic writes, a thread limit ----


SHOW = os.environ.get("RANK", "0") == "0"  # under torchrun, the first process alone shows progress


class Progress:
    """A long step's progress and ETA on one line: in place on a terminal, else after 5 s, then
    every 10 s."""

    # keep=False: a line that follows says it all
    def __init__(self, what, total, keep=True):
        self.what, self.total, self.keep, self.done = what, total, keep, 0
        self.t0 = self.last = time.time()

    def __call__(self, item=None, n=1):
        self.done, now = self.done + n, time.time()
        tty, finished = sys.stdout.isatty(), self.done >= self.total
        if SHOW and tty and finished and not self.keep:
            print("\r\033[K", end="", flush=True)  # clear the line for the one that follows
            return item
        end = finished and self.keep and (tty or self.last > self.t0)
        wait = 0.5 if tty else 5 if self.last == self.t0 else 10
        if SHOW and (end or now - self.last >= wait):
            self.last, eta = now, (now - self.t0) / self.done * (self.total - self.done)
            print(f"\r{self.what}: {self.done}/{self.total} in {now - self.t0:.0f} s, "
                  f"ETA {eta:.0f} s",
                  end="\n" if finished or not tty else "", flush=True)
        return item


def write_atomic(path, content, tmp=None):
    """Text, a function that writes to a binary file, or anything torch.save takes, whole or not at
    all, through the temporary file tmp (default: one per process). A failed write (a full disk, a
    file-size limit) leaves the earlier file intact and no temporary file behind, and is an OSError
    naming the file."""
    tmp = tmp or f"{path}.{os.getpid()}.tmp"
    try:
        if isinstance(content, str):
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                f.write(content)
        elif callable(content):
            with open(tmp, "wb") as f:
                content(f)
        else:
            torch.save(content, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not isinstance(e, (OSError, RuntimeError)):  # torch.save's full disk is a RuntimeError
            raise
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0][:100]
        raise OSError(f"could not write {path} ({reason}): free some space and rerun") from None


def check_folder(folder, flag):
    """ValueError unless folder is a writable folder, or can be made one."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):  # the folder, or where it would be made
        existing = os.path.dirname(existing)
    if not folder or not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {folder!r} is not a writable folder: choose another")


def check_room(folder, need, what, other):
    """ValueError unless the disk of folder has need bytes free; what: who needs them, with the
    verb ("the checkpoints need"); other: the fix besides freeing space."""
    free = shutil.disk_usage(folder).free
    if need > free:
        raise ValueError(f"{folder} has {free / 1e6:,.0f} MB free, {what} {need / 1e6:,.0f} MB: "
                         f"free some space {other}")


@contextlib.contextmanager
def single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# SIGTERM and SIGHUP (a closed terminal or ssh connection), where the OS has them: train.py and
# data.py treat them as Ctrl-C
SIGNALS = [getattr(signal, s) for s in ("SIGTERM", "SIGHUP") if hasattr(signal, s)]


def main(argv=None):
    for s in SIGNALS:  # kill or a closed terminal acts as Ctrl-C (the clips are kept)
        signal.signal(s, signal.default_int_handler)
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare_ave", metavar="ROOT", required=True,
                   help="folder with Annotations.txt and AVE/*.mp4")
    p.add_argument("--out", metavar="DIR", required=True,
                   help="where the prepared <VideoID>.npz files go")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--workers", type=int, default=2, help="parallel ffmpeg processes")
    p.add_argument("--overwrite", action="store_true", help="redo clips of another --image_size")
    a = p.parse_args(argv)
    try:
        prepare_ave(a.prepare_ave, a.out, a.image_size, a.workers, a.overwrite)
    except KeyboardInterrupt:  # clips are written whole, and a rerun prepares only what is missing
        sys.exit(f"interrupted: the clips prepared in {a.out} are kept: rerun to resume")
    except (ValueError, OSError) as e:  # a missing or malformed file, a flag, a full disk
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
