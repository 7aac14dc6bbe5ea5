"""What Wan and CogVideoX share: one T5 text encoder and its sentencepiece tokenizer (`tokenizer/spiece.model`)."""

from pathlib import Path

import torch

from ..models.t5 import Tokenizer
from ..pipeline import Pipeline


class T5Pipeline(Pipeline):
    def __init__(self, folder, modules, device, encoder_device, dtype, streamed=False):
        super().__init__(folder, modules, device, encoder_device, dtype, streamed)
        self.tokenizer = Tokenizer(self.spiece_of(folder))

    @classmethod
    def spiece_of(cls, folder: Path) -> Path:
        """The sentencepiece model: the folder's (a family may keep it elsewhere, Wan.spiece_of)."""
        return folder / "tokenizer" / "spiece.model"

    @classmethod
    def files_of(cls, folder: Path) -> list[str]:
        spiece = cls.spiece_of(folder)
        return [str(spiece.relative_to(folder) if spiece.is_relative_to(folder) else spiece)] + super().files_of(folder)

    def _text_states(self, prompts: list[str], max_length: int, masked: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 states (P, L, C) of the prompts, attending to padding or not, and the padding mask (P, L)."""
        ids, mask = self.tokenizer(prompts, max_length)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.text_encoder.to(self.device)(ids, mask if masked else None)
        self.text_encoder.to(self.encoder_device)
        return hidden, mask
