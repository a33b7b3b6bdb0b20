"""LoRA adapters over HTTP, as vLLM serves them: each loaded adapter is a model of its own in
GET /v1/models (parent: the base model), a request picks one by its `model` field, and - when
the engine was started with --enable-lora - POST /v1/load_lora_adapter {lora_name, lora_path}
and POST /v1/unload_lora_adapter {lora_name} change the set at run time (the files are read on
a worker thread, the weights attached between two engine steps)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from qwen35.errors import Qwen35Error
from qwen35.server.async_engine import EngineDeadError
from qwen35.server.protocol import APIError, ModelCard
from qwen35.server.serving_common import ServerState, engine_dead_error


class LoadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str
    lora_path: str


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str
    lora_int_id: int | None = None  # (vLLM's; names identify adapters here)


def lora_cards(state: ServerState) -> list[ModelCard]:
    base = state.config.served_model_name
    ctx = getattr(state.engine, "max_model_len", None)
    # root: the adapter's name, never the server's filesystem path
    return [ModelCard(id=n, root=n, parent=base, max_model_len=ctx) for n in sorted(state.loras)]


def _runtime_updates(state: ServerState) -> None:
    cfg = getattr(state.engine, "engine_config", None)
    if cfg is None or not cfg.lora.enable_lora:
        raise APIError(
            "loading LoRA adapters at run time is off: start the server with --enable-lora "
            "(adapters given with --lora-modules are served either way)",
            404,
            code="not_found",
        )


async def load_lora_adapter(state: ServerState, request: Request) -> Response:
    _runtime_updates(state)
    req: LoadLoraRequest = await state.read_request(request, LoadLoraRequest)
    name = req.lora_name.strip()
    if not name:
        raise APIError("lora_name must not be empty", param="lora_name")
    if name in state.loras or name in (*state.model_names, state.config.model_path):
        raise APIError(
            f"a model named {name!r} is already served: unload it first or pick another name",
            param="lora_name",
        )
    from qwen35.lora import LoraAdapter

    try:  # read and check the files off the event loop and the engine thread
        adapter = await state.offload(LoraAdapter, req.lora_path)
        await state.async_engine.call(state.engine.add_lora, name, adapter)
    except EngineDeadError as e:
        raise engine_dead_error(e) from None
    except Qwen35Error as e:
        raise APIError(str(e), param="lora_path") from None
    state.loras[name] = str(adapter.path)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(state: ServerState, request: Request) -> Response:
    _runtime_updates(state)
    req: UnloadLoraRequest = await state.read_request(request, UnloadLoraRequest)
    name = req.lora_name
    if name not in state.loras:
        raise APIError(f"no LoRA adapter named {name!r} is loaded", 404, param="lora_name",
                       code="not_found")  # fmt: skip
    try:
        await state.async_engine.call(state.engine.remove_lora, name)
    except EngineDeadError as e:
        raise engine_dead_error(e) from None
    except Qwen35Error as e:  # in use by running requests
        raise APIError(str(e), 409, param="lora_name", code="in_use") from None
    state.loras.pop(name, None)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
