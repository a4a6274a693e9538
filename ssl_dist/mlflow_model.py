"""The registered encoder as an MLflow pyfunc model, logged as code (MLflow "models from code").

Nothing is pickled: MLflow stores this file, and the weights travel as the `encoder` artifact
(safetensors) beside the `config` artifact (the pretraining config, YAML). `predict` takes
images as float32 ``[N, C, H, W]``, already resized and normalised like the evaluation view
(`TwoViews.plain`), and returns the encoder's features ``[N, F]``.

The model loads where ssl-dist is not installed (a downstream team's environment,
``mlflow models serve``): this file imports nothing from ``ssl_dist``, and the architecture
travels with the model as ``ssl_dist_encoders.py`` (a copy of ``ssl_dist/models/encoders.py``,
which needs only torch and timm at run time) in the model's ``code/`` folder, which MLflow puts
on ``sys.path`` before loading this file. The model's requirements list torch, timm,
safetensors, numpy and pyyaml at the versions the run used (see
``ssl_dist.tracking.model_requirements``).
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import mlflow
import numpy as np
import torch
import yaml
from mlflow.pyfunc import PythonModel
from safetensors.torch import load_file

ARCH_MODULE = "ssl_dist_encoders"
"""Module name under which the encoder architecture is shipped in the model's code folder."""


class EncoderModel(PythonModel):
    def load_context(self, context) -> None:
        with open(context.artifacts["config"]) as f:
            cfg = yaml.safe_load(f)
        arch = importlib.import_module(ARCH_MODULE)
        model_cfg = SimpleNamespace(**cfg["model"])  # the fields build_encoder reads
        data = cfg["data"]
        self.encoder = arch.build_encoder(model_cfg, data["channels"], data["image_size"])
        self.encoder.load_state_dict(load_file(context.artifacts["encoder"]), strict=True)
        self.encoder.eval()

    def predict(self, context, model_input, params=None):
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():  # local: the caller's grad mode stays as it was
            return self.encoder(x).numpy()


mlflow.models.set_model(EncoderModel())
