"""Data: the AST fbank, the synthetic AVE default and the real AVE pipeline."""
import torch
import torchaudio

# AudioSet statistics used by the released AST checkpoints (AST repo, HF ASTFeatureExtractor).
FBANK_MEAN, FBANK_STD = -4.2677393, 4.5689974
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def fbank(wave, sample_rate=16000, num_mel_bins=128, target_length=1024):
    """Mono waveform in [-1, 1] -> normalised log-mel fbank (target_length, num_mel_bins), AST recipe."""
    wave = torch.as_tensor(wave, dtype=torch.float32).reshape(-1)
    if sample_rate != 16000:
        wave = torchaudio.functional.resample(wave, sample_rate, 16000)
    if wave.numel() < 400:  # kaldi.fbank asserts on less than one 25 ms window
        wave = torch.nn.functional.pad(wave, (0, 400 - wave.numel()))
    wave = wave - wave.mean()
    fb = torchaudio.compliance.kaldi.fbank(
        wave[None], htk_compat=True, sample_frequency=16000, use_energy=False,
        window_type="hanning", num_mel_bins=num_mel_bins, dither=0.0, frame_shift=10)  # (frames, mels)
    pad = target_length - fb.shape[0]
    fb = torch.nn.functional.pad(fb, (0, 0, 0, pad)) if pad > 0 else fb[:target_length]
    return (fb - FBANK_MEAN) / (FBANK_STD * 2)
