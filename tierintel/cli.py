"""``tierintel``: ingest threat feeds, ask grounded questions, show feed freshness, serve the web
page, and evaluate on the labelled query set."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from tierintel.app import DEFAULT_BASE_URL, DEFAULT_DATA, App, Settings

EPILOG = """examples:
  tierintel ingest --mirror tierintel/fixtures/mirror --cwe bundled
  tierintel ingest --nvd-url https://services.nvd.nist.gov/rest/json/cves/2.0 --since 2026-11-01 \\
      --kev-url default --epss-url default
  tierintel ask "Which KEV entries affect Northwind Gateway?"
  tierintel ask "What is CVE-2026-41021 and should I patch it?" --base-url https://api.openai.com/v1 \\
      --model gpt-4o
  tierintel web --port 8090
  tierintel eval --out docs/results/tierintel-eval.json
  tierintel bench --records 5000 --out docs/results/tierintel-bench.json

The language model is any OpenAI-compatible endpoint: `make serve` starts tierserve on
http://127.0.0.1:8000/v1, the default. Set OPENAI_API_KEY for hosted endpoints."""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help=f"directory for the catalog and the Milvus Lite index (default {DEFAULT_DATA}"
                        "; env TIERINTEL_DATA)")
    p.add_argument("--index-uri", help="a Milvus server URI (http://host:19530) instead of the "
                                       "Milvus Lite file in --data")
    p.add_argument("--index-token", help="token for a Milvus server (user:password)")
    p.add_argument("--embedding-model", default=None,
                   help="a local sentence-transformers directory (default: the bundled "
                        "all-MiniLM-L6-v2); an index is tied to the model that built it")
    p.add_argument("-v", "--verbose", action="store_true", help="log what each step does")


def _llm(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=DEFAULT_BASE_URL,
                   help=f"OpenAI-compatible endpoint (default {DEFAULT_BASE_URL}; env "
                        "TIERINTEL_BASE_URL)")
    p.add_argument("--model", help="model name (default: the endpoint's first model)")
    p.add_argument("--max-tokens", type=int, default=160, help="tokens the answer may take")
    p.add_argument("--max-prompt-chars", type=int, default=6000,
                   help="characters of records in the prompt (fit it to the model's context)")
    p.add_argument("--max-answer-chars", type=int, default=500,
                   help="maxLength of the answer in the JSON schema; 0 leaves it out (OpenAI's "
                        "strict mode may refuse maxLength)")
    p.add_argument("--no-structured", action="store_true",
                   help="plain text replies instead of a JSON schema (for endpoints without "
                        "structured outputs)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="tierintel", description=__doc__, epilog=EPILOG,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ingest", help="read feeds into the catalog and bring the index up to date")
    _common(p)
    p.add_argument("--mirror", type=Path, help="a local mirror directory (nvd/, kev/, epss/, cwe/)")
    p.add_argument("--nvd-url", help="NVD CVE API 2.0 URL ('default' for NVD's)")
    p.add_argument("--nvd-api-key", help="NVD API key (raises NVD's rate limit)")
    p.add_argument("--since", help="with --nvd-url: only CVEs modified since this date (YYYY-MM-DD; "
                                   "pulled in NVD's 120-day windows)")
    p.add_argument("--kev-url", help="CISA KEV JSON URL ('default' for CISA's)")
    p.add_argument("--epss-url", help="EPSS CSV URL ('default' for the current scores)")
    p.add_argument("--cwe", help="a cwec_v*.xml, or 'bundled' for the catalog cwe2 ships")
    p.add_argument("--reindex", action="store_true", help="drop the index and embed everything")
    p.add_argument("--batch-size", type=int, default=128, help="documents per embedding step")
    p = sub.add_parser("ask", help="answer a question from the index")
    _common(p)
    _llm(p)
    p.add_argument("question")
    p.add_argument("--today", help="the date 'this month' refers to (default: the EPSS score date)")
    p.add_argument("--json", action="store_true", help="print the whole answer object as JSON")
    p = sub.add_parser("status", help="records held, feed freshness and recent changes")
    _common(p)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("web", help="serve the question page (FastAPI)")
    _common(p)
    _llm(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    p = sub.add_parser("eval", help="recall@5, answer rule checks and the model-alone baseline on "
                                    "the labelled query set")
    _common(p)
    _llm(p)
    p.add_argument("--queries", type=Path, default=None, help="a queries.jsonl (default: shipped)")
    p.add_argument("--retrieval-only", action="store_true", help="no language model")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--limit", type=int, default=0, help="first N questions only")
    p.add_argument("--out", type=Path, help="write the full results as JSON (and a .png plot)")
    p = sub.add_parser("bench", help="ingestion and retrieval throughput on N generated CVEs")
    p.add_argument("--records", type=int, default=5000)
    p.add_argument("--embedding-model", default=None)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--out", type=Path, help="write the result as JSON")
    p.add_argument("-v", "--verbose", action="store_true")
    return top


def settings(args) -> Settings:
    s = Settings(data=args.data, index_uri=args.index_uri, index_token=args.index_token)
    if args.embedding_model:
        s.embedding_model = args.embedding_model
    if hasattr(args, "base_url"):
        s.base_url, s.model, s.max_tokens = args.base_url, args.model, args.max_tokens
        s.structured = not args.no_structured
        s.max_answer_chars = args.max_answer_chars or None
        s.max_prompt_chars = args.max_prompt_chars
    return s


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from tierintel.answer import LLMError
    from tierintel.index import IndexError_

    try:
        return COMMANDS[args.command](args)
    except LLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, IndexError_) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def cmd_ingest(args) -> int:
    from tierintel import fetch
    from tierintel.feeds.cwe import bundled_catalog
    from tierintel.ingest import Ingestor

    def url(value: str | None, default: str) -> str | None:
        return default if value == "default" else value

    cwe = bundled_catalog() if args.cwe == "bundled" else (Path(args.cwe) if args.cwe else None)
    sources = fetch.Sources(mirror=args.mirror, nvd_url=url(args.nvd_url, fetch.NVD_API),
                            kev_url=url(args.kev_url, fetch.KEV_URL),
                            epss_url=url(args.epss_url, fetch.EPSS_URL), cwe_path=cwe,
                            nvd_api_key=args.nvd_api_key)
    if args.since:
        sources.last_mod_start = f"{args.since}T00:00:00.000"
        sources.last_mod_end = time.strftime("%Y-%m-%dT%H:%M:%S.000", time.gmtime())
    if not (args.mirror or args.nvd_url or args.kev_url or args.epss_url or cwe):
        raise ValueError("nothing to ingest: give --mirror and/or feed URLs (see --help)")
    app = App(settings(args))
    if args.reindex:
        from tierintel.index import drop_collections

        drop_collections(app.index_uri, args.index_token)
        app.catalog.forget(app.catalog.indexed_ids())
        app.catalog.set_meta("embedding_model", app.embedder.name)
    report = Ingestor(app.catalog, app.index, app.embedder, args.batch_size,
                      progress=sys.stderr.isatty()).run(sources)
    print(json.dumps(report.summary(), indent=2))
    for source, error in report.files_failed:
        print(f"skipped unreadable file {source}: {error}", file=sys.stderr)
    for _source, error in report.schema_errors:
        print(f"error: {error}", file=sys.stderr)
    if report.schema_errors:
        return 2
    # A download that failed leaves the catalog behind the feed: say so in the exit status (a
    # malformed file in a mirror is only skipped and counted).
    return 1 if any(s.startswith(("http://", "https://")) for s, _ in report.files_failed) else 0


def cmd_ask(args) -> int:
    answer = App(settings(args)).ask(args.question, today=args.today)
    if args.json:
        print(json.dumps(answer.to_dict(), indent=2))
    else:
        print(answer.text)
        if answer.sources:
            print("\nSources:")
            for source in answer.sources:
                print(f"  {source['id']}: {source['url']}")
    return 0


def cmd_status(args) -> int:
    status = App(settings(args)).status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"data {status['data']}, index {status['index_uri']}, as of {status['as_of'] or '-'}")
    print("records: " + ", ".join(f"{k} {v}" for k, v in status["records"].items()))
    for kind, state in status["feeds"].items():
        print(f"  {kind:5s} {state['files']} file(s), newest feed date "
              f"{state['newest_feed_date'] or '-'}, version {state['version'] or '-'}")
    return 0


def cmd_web(args) -> int:
    import uvicorn

    from tierintel.web import create_app

    uvicorn.run(create_app(App(settings(args))), host=args.host, port=args.port,
                log_level="info" if args.verbose else "warning")
    return 0


def cmd_eval(args) -> int:
    from tierintel.evaluate import QUERIES, load_queries, run_eval

    app = App(settings(args))
    queries = load_queries(args.queries or QUERIES)
    queries = queries[: args.limit] if args.limit else queries
    answerer = None if args.retrieval_only else app.answerer
    result = run_eval(app.retriever(), answerer, app.catalog, queries,
                      baseline=not args.no_baseline, concurrency=args.concurrency)
    result["settings"] = {"base_url": args.base_url, "model": answerer.model if answerer else None,
                          "embedding_model": app.embedder.name, "index_uri": app.index_uri}
    summary = {k: v for k, v in result.items() if k != "rows"}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))
        if answerer is not None:
            from tierintel.plot import plot_eval

            plot_eval(result, args.out.with_suffix(".png"))
    return 0


def cmd_bench(args) -> int:
    from tierintel.bench import run

    result = run(args.records, args.embedding_model, args.queries)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


COMMANDS = {"bench": cmd_bench, "ingest": cmd_ingest, "ask": cmd_ask, "status": cmd_status, "web": cmd_web,
            "eval": cmd_eval}

if __name__ == "__main__":
    sys.exit(main())
