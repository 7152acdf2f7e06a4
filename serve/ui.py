"""The Gradio chat demo: a ``gr.ChatInterface`` (messages format, streaming) with a system prompt and sampling
controls. It calls the OpenAI-compatible API over HTTP with the official client, as any other client would,
so the demo exercises the same routes, limits and auth. Mounted at /demo by the ingress (serve/ingress.py)."""
from __future__ import annotations

from collections.abc import AsyncIterator

from cluster.schemas.serve import ServeConfig

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


def _text(content) -> str:
    """Gradio 6 history content: a string, or a list of parts / a dict for files; we keep the text."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, list):
        return "".join(_text(c) for c in content)
    return ""


def to_openai_messages(message, history: list[dict], system_prompt: str) -> list[dict]:
    """ChatInterface's (message, history) in messages format -> the OpenAI messages list."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    for turn in history:
        if turn.get("role") in ("user", "assistant") and _text(turn.get("content")):
            messages.append({"role": turn["role"], "content": _text(turn["content"])})
    messages.append({"role": "user", "content": _text(message)})
    return messages


def build_demo(api_url: str, api_key: str | None, cfg: ServeConfig):
    import gradio as gr
    from openai import APIError, AsyncOpenAI

    client = AsyncOpenAI(base_url=api_url, api_key=api_key or "no-key", max_retries=0,
                         timeout=cfg.request_timeout_s)

    async def respond(message, history, system_prompt, temperature, top_p, max_tokens) -> AsyncIterator[str]:
        text = ""
        try:
            stream = await client.chat.completions.create(
                model=cfg.model_name, messages=to_openai_messages(message, history, system_prompt),
                temperature=float(temperature), top_p=float(top_p), max_tokens=int(max_tokens), stream=True)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
                    yield text
        except APIError as exc:  # show the API's own message (e.g. prompt too long) in the chat
            yield f"{text}\n\n[error: {exc.message}]"
            return
        if not text:
            yield "(the model returned no text)"

    return gr.ChatInterface(
        respond,
        title="raylm chat",
        description=f"Model `{cfg.model_name}` served by Ray Serve; API at `{api_url}`."
                    + (" [Run report](/report) (what the model was made from, curves, eval)." if cfg.report else ""),
        additional_inputs=[
            gr.Textbox(DEFAULT_SYSTEM_PROMPT, label="System prompt"),
            gr.Slider(0.0, 2.0, value=0.8, step=0.05, label="Temperature"),
            gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p"),
            gr.Slider(1, cfg.max_new_tokens, value=min(64, cfg.max_new_tokens), step=1, label="Max new tokens"),
        ],
        additional_inputs_accordion=gr.Accordion("Sampling", open=False),
        fill_height=True,
    )
