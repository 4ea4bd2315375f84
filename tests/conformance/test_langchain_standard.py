"""LangChain's standard chat-model integration tests (``langchain-tests``) on ``ChatOpenAI``
pointed at lorad's HTTP door. Run by ``tests/test_langchain.py`` in a pytest of its own (these
tests are asyncio's; lorad's suite is trio's), against the door at ``$LORAD_HTTP_URL`` serving
``$LORAD_MODEL``. What lorad does not do is declared, so those tests are skipped, not failed.
"""

from __future__ import annotations

import os
from typing import Any

from langchain_openai import ChatOpenAI
from langchain_tests.integration_tests import ChatModelIntegrationTests


class TestLoradChatOpenAI(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatOpenAI]:
        return ChatOpenAI

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": os.environ["LORAD_MODEL"], "api_key": "unused",
                "base_url": os.environ["LORAD_HTTP_URL"] + "/v1", "max_retries": 0,
                "temperature": 0, "max_tokens": int(os.environ.get("LORAD_MAX_TOKENS", "48")),
                "stream_usage": True}

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def structured_output_kwargs(self) -> dict[str, Any]:
        return {"method": "json_schema"}

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    # Not served: text only, and one model per request (no model override per call).
    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_image_urls(self) -> bool:
        return False

    @property
    def supports_pdf_inputs(self) -> bool:
        return False

    @property
    def supports_audio_inputs(self) -> bool:
        return False

    @property
    def supports_video_inputs(self) -> bool:
        return False

    @property
    def supports_anthropic_inputs(self) -> bool:
        return False

    @property
    def supports_image_tool_message(self) -> bool:
        return False

    @property
    def supports_pdf_tool_message(self) -> bool:
        return False
