"""The methods, each a LightningModule on its own plain `nn.Module` network.

Imported here so that configs name them by class name (`class_path: CFViTLitModule`).
"""

from adaptive_vit.methods.base import AdaptiveLitModule  # noqa: F401
from adaptive_vit.methods.static import StaticViTLitModule  # noqa: F401
from adaptive_vit.methods.cfvit.lit import CFViTLitModule  # noqa: F401
from adaptive_vit.methods.dvt.lit import DVTLitModule  # noqa: F401
from adaptive_vit.methods.mia.lit import MIALitModule  # noqa: F401
