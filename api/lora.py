"""vLLM's runtime LoRA endpoints: POST /v1/load_lora_adapter and /v1/unload_lora_adapter (served with
--allow-runtime-lora-updating, behind the API key), answered in vLLM's plain-text words."""

from __future__ import annotations

from typing import Callable

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from models import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from serving.text_service import TextService


def lora_router(ready: Callable[[], TextService]) -> APIRouter:
    router = APIRouter()

    @router.post("/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest, service: TextService = Depends(ready)):
        await service.load_adapter(body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @router.post("/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, service: TextService = Depends(ready)):
        service.unload_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return router
