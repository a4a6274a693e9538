"""The registered encoder as an MLflow pyfunc model, logged as code (MLflow "models from code").

Nothing is pickled: MLflow stores this file, and the weights travel as the `encoder` artifact
(safetensors) beside the `config` artifact (the pretraining config, YAML). `predict` takes
images as float32 ``[N, C, H, W]``, already resized and normalised like the evaluation view
(`TwoViews.plain`), and returns the encoder's features ``[N, F]``.
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class EncoderModel(PythonModel):
    def load_context(self, context) -> None:
        import yaml
        from safetensors.torch import load_file

        from ssl_dist.config import Config
        from ssl_dist.models import build_encoder

        with open(context.artifacts["config"]) as f:
            cfg = Config.model_validate(yaml.safe_load(f))
        self.encoder = build_encoder(cfg.model, cfg.data.channels, cfg.data.image_size)
        self.encoder.load_state_dict(load_file(context.artifacts["encoder"]), strict=True)
        self.encoder.eval()

    def predict(self, context, model_input, params=None):
        import torch

        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():  # local: the caller's grad mode stays as it was
            return self.encoder(x).numpy()


mlflow.models.set_model(EncoderModel())
