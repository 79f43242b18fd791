"""The Libra model on megatron-core (see docs/design.md, "Model")."""
from libra_megatron.model.libra_model import LibraModel
from libra_megatron.model.output import libra_loss_reduction
from libra_megatron.model.routing import ModalityRouting

__all__ = ["LibraModel", "ModalityRouting", "libra_loss_reduction"]
