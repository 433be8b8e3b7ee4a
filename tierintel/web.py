"""The web page: a question box, answers with linked sources, and feed freshness; a FastAPI app
over the same ``App`` the CLI uses. JSON errors follow OpenAI's shape."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field

from tierintel.answer import LLMError, LLMUnavailable
from tierintel.app import App


class AskBody(BaseModel):
    question: str = Field(min_length=1, max_length=2000)
    today: str | None = Field(default=None, pattern=r"^\d{4}-\d{2}-\d{2}$")


def error(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                        status_code=status)


def create_app(app: App) -> FastAPI:
    web = FastAPI(title="tierintel", description="Threat intelligence answers grounded in NVD, "
                  "CISA KEV, FIRST EPSS and CWE records.")
    in_flight = asyncio.Semaphore(4)  # answers at once; the model endpoint batches them

    @web.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = exc.errors()
        where = ".".join(str(p) for p in detail[0]["loc"][1:]) if detail else "body"
        message = detail[0]["msg"] if detail else "invalid request"
        return error(400, f"{where}: {message}", "invalid_request_error")

    @web.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE

    @web.get("/api/status")
    async def status() -> dict:
        return await asyncio.to_thread(app.status)

    @web.post("/api/ask")
    async def ask(body: AskBody):
        async with in_flight:
            try:
                answer = await asyncio.to_thread(app.ask, body.question, body.today)
            except ValueError as e:
                return error(400, str(e), "invalid_request_error")
            except LLMUnavailable as e:
                return error(503, str(e), "service_unavailable", "llm_unavailable")
            except LLMError as e:
                return error(502, str(e), "upstream_error", "llm_refused")
        return answer.to_dict()

    return web


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tierintel: threat intelligence</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font-family:system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;color:#222}
 h1{font-size:1.4rem} form{display:flex;gap:.5rem} input{flex:1;padding:.5rem;font-size:1rem}
 button{padding:.5rem 1rem;font-size:1rem} #answer{white-space:pre-wrap;margin-top:1rem;
 padding:1rem;background:#f6f8fa;border-radius:6px;min-height:2rem}
 #sources li{margin:.2rem 0} #freshness{font-size:.85rem;color:#555;margin-top:2rem}
 .error{color:#b00020} .examples a{margin-right:1rem;font-size:.9rem}
</style></head><body>
<h1>tierintel: ask about CVEs, KEV entries, EPSS scores and CWEs</h1>
<form id="ask-form"><input id="question" name="question" autocomplete="off"
 placeholder="What is CVE-2021-44228 and should I patch it?"><button id="ask" type="submit">Ask
 </button></form>
<p class="examples">Try: <a href="#">Which KEV entries affect Northwind Gateway?</a>
<a href="#">Top EPSS CVEs for CWE-79 this month?</a><a href="#">How does CWE-78 relate to CWE-77?</a></p>
<div id="answer" aria-live="polite"></div>
<ul id="sources"></ul>
<div id="freshness">Loading feed freshness...</div>
<script>
const $ = (id) => document.getElementById(id);
function esc(s){return String(s).replace(/[&<>"']/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;',
 '"':'&quot;',"'":'&#39;'}[c]));}
async function ask(question){
  $('answer').className=''; $('answer').textContent='Thinking...'; $('sources').innerHTML='';
  try{
    const r = await fetch('/api/ask',{method:'POST',headers:{'Content-Type':'application/json'},
                                      body:JSON.stringify({question})});
    const data = await r.json();
    if(!r.ok){ $('answer').className='error'; $('answer').textContent=data.error.message; return; }
    $('answer').textContent = data.text;
    $('sources').innerHTML = data.sources.map(s =>
      `<li><a class="source" href="${esc(s.url)}" target="_blank" rel="noopener">${esc(s.id)}</a></li>`
    ).join('');
  }catch(e){ $('answer').className='error'; $('answer').textContent='Request failed: '+e; }
}
$('ask-form').addEventListener('submit', e => { e.preventDefault();
  const q=$('question').value.trim(); if(q) ask(q); });
document.querySelectorAll('.examples a').forEach(a => a.addEventListener('click', e => {
  e.preventDefault(); $('question').value=a.textContent; ask(a.textContent); }));
fetch('/api/status').then(r=>r.json()).then(s => {
  const f = Object.entries(s.feeds).map(([k,v]) =>
    `${esc(k.toUpperCase())}: ${v.files} file(s), feed date ${esc(v.newest_feed_date||'none')}`);
  $('freshness').innerHTML = `Index as of ${esc(s.as_of||'never')} &middot; `+
    `${s.records.cves} CVEs, ${s.records.kev} KEV entries, ${s.records.cwes} CWEs<br>`+f.join(' &middot; ');
}).catch(()=>{$('freshness').textContent='Feed status unavailable';});
</script></body></html>
"""
