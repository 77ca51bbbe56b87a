"""What Replicate's API changes that this server's config decides: creating models and
deployments, deleting versions, and training. Each is refused with 405 and what to do
instead, so client code that tries it learns why; a training list is empty, as none runs
here."""

from __future__ import annotations

from fastapi import APIRouter

from serve.errors import AtelierError

router = APIRouter()


class ManagedByConfig(AtelierError):
    status = 405
    kind = "method_not_allowed"


class TrainingNotFound(AtelierError):
    status = 404
    kind = "training_not_found"


@router.post("/v1/deployments", summary="Replicate: create a deployment (refused)")
@router.patch("/v1/deployments/{owner}/{name}", summary="Replicate: update (refused)")
@router.delete("/v1/deployments/{owner}/{name}", summary="Replicate: delete (refused)")
async def manage_deployment() -> None:
    raise ManagedByConfig("deployments are this server's models, made by its config: add an "
                          "alias to a model to serve a deployment name")


@router.post("/v1/models", summary="Replicate: create a model (refused)")
@router.delete("/v1/models/{owner}/{name}/versions/{version}",
               summary="Replicate: delete a version (refused)")
async def manage_model() -> None:
    raise ManagedByConfig("models and their versions are this server's config: add the "
                          "model's weights to it and redeploy (see python -m serve.check)")


@router.post("/v1/models/{owner}/{name}/versions/{version}/trainings",
             summary="Replicate: train a model (refused)")
async def create_training() -> None:
    raise ManagedByConfig("this server serves models and does not train them: put a LoRA "
                          "adapter trained elsewhere in a lora folder, or name its URL in "
                          "a request's loras")


@router.get("/v1/trainings", summary="Replicate: list trainings (none run here)")
async def list_trainings() -> dict:
    return {"results": [], "next": None, "previous": None}


@router.get("/v1/trainings/{training_id}", summary="Replicate: get a training (none here)")
@router.post("/v1/trainings/{training_id}/cancel", summary="Replicate: cancel (none here)")
async def get_training(training_id: str) -> None:
    raise TrainingNotFound(f"no training {training_id!r}: this server does not train models")
