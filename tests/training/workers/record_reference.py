"""Worker for test_lora: a DFT training run (one process) that also records every reference
log-prob it scores, with the step and the example indices.

Usage: python record_reference.py OUTPUT.pt key=value ...
"""

from __future__ import annotations

import sys

import torch

from nemo_dft.config.training import load_config
from nemo_dft.training import model as model_module
from nemo_dft.training.train import train


def main(output: str, overrides: list[str]) -> None:
    records: list[dict] = []
    original = model_module.DFTModel.reference_token_logps

    def recording(self, batch):
        logps = original(self, batch)
        records.append({"step": int(self.trainer.global_step), "index": batch["example_index"].detach().clone(),
                        "logps": logps.detach().clone()})
        return logps

    model_module.DFTModel.reference_token_logps = recording
    train(load_config(overrides=overrides))
    torch.save(records, output)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
