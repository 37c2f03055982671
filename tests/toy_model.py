"""A two-layer toy encoder whose params carry logical axes, for sharding and loss tests."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jfe_jax.models.axes import ACT_BATCH, ACT_MLP, EMBED, MLP, constrain, param_init


class ToyEncoder(nn.Module):
    """Two dense layers with (EMBED, MLP) / (MLP, EMBED) kernels and a learnable temperature."""

    hidden: int = 32
    dim: int = 16

    @nn.compact
    def __call__(self, batch):
        self.param("log_temperature", param_init(nn.initializers.constant(np.log(0.05)), ()), ())

        def dense(features, names, name):
            return nn.Dense(
                features,
                kernel_init=param_init(nn.initializers.lecun_normal(), names),
                bias_init=param_init(nn.initializers.normal(0.1), names[1:]),
                name=name,
            )

        hidden = nn.gelu(dense(self.hidden, (EMBED, MLP), "up")(batch["features"]))
        hidden = constrain(hidden, (ACT_BATCH, ACT_MLP))
        embeddings = dense(self.dim, (MLP, EMBED), "down")(hidden)
        return embeddings / jnp.linalg.norm(embeddings, axis=-1, keepdims=True)
