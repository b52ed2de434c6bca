"""Optimizers (K2 paper §2.1): Muon, and MuonClip = Muon + AdamW + per-head QK-Clip."""

from openk2.optim.muon import Muon, newton_schulz
from openk2.optim.muon_clip import MuonClip, split_parameters
from openk2.optim.qk_clip import QKClip, QKClipStats, find_clip_targets

__all__ = ["Muon", "MuonClip", "QKClip", "QKClipStats", "find_clip_targets", "newton_schulz", "split_parameters"]
