"""A LangChain agent loop (langchain-openai's ChatOpenAI, bind_tools) against tierserve serve
with SmolLM2: two different tools called, their results fed back as ToolMessages, then an
answer. The 135M model does not choose tools on its own, so each turn names the tool to call
(tool_choice), as an agent with a fixed plan does; what is checked is the protocol round trip."""

from __future__ import annotations

import pytest

langchain_openai = pytest.importorskip("langchain_openai")

from langchain_core.messages import HumanMessage, ToolMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402

from tests.server.conftest import ServerProcess  # noqa: E402


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


TOOLS = {"add": add, "multiply": multiply}


@pytest.fixture(scope="module")
def server(smollm2_path):
    # Packed weights (the GGUF as stored): what these tests check is the API's tool calling,
    # not the float path's numerics (the parity tests own those); decode is several times faster.
    proc = ServerProcess(smollm2_path, "--kv-cache-memory", "128MiB", "--max-model-len", "2048",
                         "--quantization", "gguf")
    yield proc
    proc.stop()


def test_an_agent_calls_two_tools_and_answers(server):
    llm = langchain_openai.ChatOpenAI(base_url=server.url + "/v1", api_key="none",
                                      model="tiny", temperature=0, max_tokens=120,
                                      max_retries=0)
    messages = [HumanMessage("What is (3 + 4) * 5? First add, then multiply.")]
    called = []
    for name in ("add", "multiply"):
        reply = llm.bind_tools(list(TOOLS.values()), tool_choice=name).invoke(messages)
        assert reply.tool_calls, reply
        messages.append(reply)
        for call in reply.tool_calls:
            assert call["name"] == name and set(call["args"]) == {"a", "b"}
            assert all(isinstance(v, int) for v in call["args"].values())
            result = TOOLS[call["name"]].invoke(call["args"])
            messages.append(ToolMessage(str(result), tool_call_id=call["id"]))
            called.append(call["name"])
    answer = llm.bind_tools(list(TOOLS.values()), tool_choice="none").invoke(messages)
    assert called[0] == "add" and set(called) == {"add", "multiply"}
    assert isinstance(answer.content, str) and answer.content.strip()
    assert not answer.tool_calls
