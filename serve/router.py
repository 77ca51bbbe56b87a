"""Routes a GenerationRequest to the deployment of its base model."""

from __future__ import annotations

from collections.abc import Mapping

from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from serve.config import AtelierConfig, ModelConfig
from serve.errors import ModelNotFound, Overloaded
from serve.types import GenerationRequest, GenerationResult


class ModelRouter:
    """Resolves model ids and aliases, and sends requests to the right deployment."""

    def __init__(self, config: AtelierConfig, handles: Mapping[str, DeploymentHandle]):
        self.config = config
        self._handles = dict(handles)
        self._by_name: dict[str, ModelConfig] = {}
        for model in config.models:
            for name in (model.id, *model.aliases):
                self._by_name[name] = model

    @property
    def default(self) -> ModelConfig:
        return self.config.models[0]

    def resolve(self, name: str | None) -> ModelConfig:
        """The model named by id or alias (the first configured one for None).

        Raises ModelNotFound.
        """
        if name is None:
            return self.default
        try:
            return self._by_name[name]
        except KeyError:
            raise ModelNotFound(name, [m.id for m in self.config.models]) from None

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run `request` (whose `model` is a resolved id) on its model's deployment.

        Raises Overloaded when every replica's queue is full or none is running.
        """
        try:
            return await self._handles[request.model].generate.remote(request)
        except BackPressureError:
            raise Overloaded(f"all replicas of {request.model} are busy; retry later") from None
        except DeploymentUnavailableError:
            raise Overloaded(f"{request.model} has no running replica yet; retry later") from None
