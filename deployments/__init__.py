"""GPU side of Atelier: model deployments, batching and engines. Never sees HTTP."""

import logging


class _NoEmptyFloat32List(logging.Filter):
    """diffusers warns at every cast of a model to a dtype that "modules that should be
    kept in float32" may suffer, even when it names none (`[]`): that warning is dropped,
    wherever models are built or loaded here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_NoEmptyFloat32List())
