"""The Gradio page: Ask, History, Batch, Search and Evaluate tabs wired to ui/ask.py, ui/batch.py,
ui/search.py and ui/evaluate.py. Every handler turns a failure into words on the page (ask.explain); none lets a stack
trace reach the browser. The page checks the gateway every few seconds and says when it is down.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path

# Offline by design: no usage analytics, no update checks, no hub look-ups (set before gradio loads).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gradio as gr  # noqa: E402

from shelfsight import errors  # noqa: E402
from shelfsight.client.batch import DEFAULT_QUESTION as BATCH_QUESTION  # noqa: E402
from shelfsight.client.client import Connection, ShelfsightClient  # noqa: E402
from shelfsight.evaluation.run import STUDY_SETTINGS  # noqa: E402
from shelfsight.params import Limits  # noqa: E402
from shelfsight.ui import ask, batch, evaluate, search  # noqa: E402
from shelfsight.ui.settings import UISettings  # noqa: E402

log = logging.getLogger("shelfsight.ui")
POLL = 0.3  # seconds between looks at a running batch or evaluation
CSS = ".error-note p { color: var(--error-text-color); font-weight: 600; }"


def photo_box(**kw) -> gr.Image:
    """gr.Image that hands over the uploaded file untouched: the gateway gets the person's exact bytes
    (so answers match `shelfsight ask` on the same file) and a file that is not an image reaches our
    own check, which says what is wrong, instead of failing inside Gradio. An instance override, not a
    subclass: Gradio writes a .pyi stub beside any module that subclasses one of its components."""
    box = gr.Image(type="filepath", image_mode=None, **kw)
    box.preprocess = lambda payload: None if payload is None else payload.path
    return box


def _note(text: str) -> str:
    return f"**Error:** {text}" if text else ""


def build(settings: UISettings) -> gr.Blocks:
    workdir = settings.workdir or Path(tempfile.mkdtemp(prefix="shelfsight-ui-"))
    target = settings.target
    shown = Connection.of(target).target  # what the page names: the address, never a key

    def words(e: Exception) -> str:
        if not isinstance(e, errors.ShelfsightError):
            log.exception("unexpected failure in a UI handler")
        return ask.explain(e, shown, settings.timeout)

    # ---- gateway status ----
    def gateway_status() -> str:
        try:
            with ShelfsightClient(target) as client:
                state = client.health()
        except errors.ShelfsightError:
            return (f"**Gateway {shown} is down:** not reachable (checked {time.strftime('%H:%M:%S')}). "
                    "Answers will fail until it is back; this page keeps working.")
        if state == "SERVING":
            return f"Gateway {shown}: **ready**"
        return f"Gateway {shown}: **up, the model is not ready** ({state})"

    # ---- Ask ----
    def show_photo(path, enhance):
        if not path:
            return None, ""
        try:
            return ask.as_model_sees(ask.read_photo(path), enhance), ""
        except errors.InvalidArgument as e:
            return None, _note(f"this file cannot be used as a photo: {e}.")
        except Exception as e:  # noqa: BLE001
            return None, _note(words(e))

    def run_ask(path, question, *values):  # values: the controls' widgets (ask.Controls order), then history
        *values, history = values
        history = list(history or [])
        hidden = gr.update(visible=False, value=None)
        try:
            controls = ask.Controls.from_page(*values)
            data = ask.read_photo(path)
            ask.as_model_sees(data)  # a bad photo is named here, before the gateway is asked
            view = ask.View()
            for view in ask.stream_answer(target, data, question, controls, timeout=settings.timeout):
                yield view.text, view.text, hidden, ask.meta_markdown(view), "", history, ask.history_rows(history)
        except Exception as e:  # noqa: BLE001
            yield "", "", hidden, "", _note(words(e)), history, ask.history_rows(history)
            return
        found = ask.json_table(view.text)
        tbl = gr.update(visible=True, value=found[1], headers=found[0]) if found else hidden
        history.append(dataclasses.asdict(ask.Entry.make(path, question, controls, view)))
        yield view.text, view.text, tbl, ask.meta_markdown(view), "", history, ask.history_rows(history)

    # ---- History ----
    def reopen(history, evt: gr.SelectData):
        entry = list(reversed(history or []))[evt.index[0]]
        meta = "\n".join(f"- {k}: {v}" for k, v in entry["meta"].items())
        return (entry["photo_path"], entry["question"], entry["answer"], entry["answer"], meta,
                *ask.Controls(**entry["controls"]).to_page(), gr.Tabs(selected="ask"))

    def export_history(history):
        if not history:
            return gr.skip(), _note("nothing asked yet in this session")
        path = workdir / f"history-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        return str(ask.history_jsonl(history, path)), f"{len(history)} answers exported"

    # ---- Batch ----
    def run_batch(uploads, question, *values):  # values: the controls' widgets (ask.Controls order), then the folder
        *values, folder = values
        no_files = gr.update(value=None, interactive=False)
        try:
            controls = ask.Controls.from_page(*values)
            question = (question or "").strip() or BATCH_QUESTION
            # the same uploads asked again: resume the same batch (only unanswered photos are asked)
            if folder and Path(folder, "photos").is_dir():
                items, skipped = sorted((p.name, p) for p in Path(folder, "photos").iterdir()), []
            else:
                fresh = workdir / f"batch-{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**6}"
                items, skipped = batch.stage(uploads, fresh / "photos")
                folder = str(fresh)
            out = Path(folder) / batch.RESULTS
            left_out = f"left out (not photos): {', '.join(skipped)}" if skipped else ""
            job = batch.start(target, items, out, question, timeout=settings.timeout, **controls.request())
        except Exception as e:  # noqa: BLE001
            yield gr.skip(), gr.skip(), _note(words(e)), no_files, no_files, folder
            return
        while True:
            running = job.alive()
            results, failures = batch.read_rows(out, question)
            done = len(results) + len({f["image"] for f in failures} - {r["image"] for r in results})
            bar = (f"<progress id='batch-progress' value='{done}' max='{len(items)}'></progress> "
                   f"{len(results)} of {len(items)} answered" + (f", {len(failures)} failed" if failures else ""))
            if not running:
                break
            yield bar, batch.table(items, results, failures), left_out, no_files, no_files, folder
            job.wait(POLL)
        note = _note(words(job.error)) if job.error else left_out
        if failures and not job.error:
            note = _note(f"{len(failures)} photo(s) failed (see the error column); press Ask again to retry them") \
                + (f" ({left_out})" if left_out else "")
        csv_path, jsonl_path = batch.export(results, failures, out)
        yield (bar, batch.table(items, results, failures), note, gr.update(value=str(csv_path), interactive=True),
               gr.update(value=str(jsonl_path), interactive=True), folder)

    # ---- Search ----
    def run_search(path, text, top_k, filters, rerank):
        try:
            data = ask.read_photo(path) if path else None
            if data:
                ask.as_model_sees(data)  # a bad photo is named here, before the gateway is asked
            found = search.search(target, data, text, top_k, filters, rerank, timeout=settings.timeout)
        except Exception as e:  # noqa: BLE001
            return [], [], "", _note(words(e))
        return found.gallery, found.rows, found.meta, ""

    # ---- Evaluate ----
    def run_eval(data_dir, max_new_tokens):
        def pick():  # the newest run as B, the one before as A: ready to compare
            done = evaluate.finished_runs(workdir)
            return (gr.update(choices=done, value=done[1] if len(done) > 1 else None),
                    gr.update(choices=done, value=done[0] if done else None))
        try:
            job, out, total = evaluate.start(data_dir, target, workdir, int(max_new_tokens or 0), timeout=settings.timeout)
        except Exception as e:  # noqa: BLE001
            yield "", _note(words(e)), *pick()
            return
        while job.alive():
            n = evaluate.asked(out)
            yield f"<progress value='{n}' max='{total}'></progress> {n} of {total} asked", "", gr.skip(), gr.skip()
            job.wait(POLL)
        if job.error:
            yield "", _note(words(job.error)), *pick()
            return
        yield f"done: {total} images scored into {out}", evaluate.report(out), *pick()

    def run_compare(a, b):
        try:
            return evaluate.compare(a, b)
        except Exception as e:  # noqa: BLE001
            return _note(words(e)), "", ""

    defaults = ask.Controls()
    # uploads Gradio keeps in its temp folder are dropped after a day (checked hourly)
    with gr.Blocks(title="shelfsight workbench", delete_cache=(3600, 24 * 3600)) as page:
        gr.Markdown("## shelfsight · product-recognition workbench")
        status = gr.Markdown(elem_id="gateway-status")
        history = gr.State([])
        batch_folder = gr.State(None)
        with gr.Tabs() as tabs:
            with gr.Tab("Ask", id="ask"):
                with gr.Row():
                    with gr.Column(scale=1):
                        photo = photo_box(label="Photo: drop, pick or paste (JPEG, PNG, WebP, BMP, GIF)",
                                          sources=["upload", "clipboard"], elem_id="photo", height=260)
                        seen = gr.Image(label="As the model sees it (EXIF orientation, RGB, enhancement)",
                                        interactive=False, elem_id="seen", height=260, format="png")
                        photo_note = gr.Markdown(elem_id="photo-note", elem_classes="error-note")
                    with gr.Column(scale=2):
                        preset = gr.Radio(list(ask.PRESETS), label="Preset questions", elem_id="preset")
                        question = gr.Textbox(label="Question", value=ask.PRESETS["Brand"], lines=2, elem_id="question")
                        go = gr.Button("Ask", variant="primary", elem_id="ask-button")
                        error = gr.Markdown(elem_id="ask-error", elem_classes="error-note")
                        answer_md = gr.Markdown(label="Answer", elem_id="answer", min_height=60)
                        json_tbl = gr.Dataframe(label="Answer as a table", visible=False, interactive=False,
                                                elem_id="answer-table")
                        meta = gr.Markdown(elem_id="meta")
                        answer_text = gr.Textbox(label="Answer as plain text", lines=3, interactive=False,
                                                 buttons=["copy"], elem_id="answer-text")
                with gr.Accordion("Generation controls (defaults: the serving defaults)", open=True):
                    with gr.Row():
                        temperature = gr.Slider(0, 2, value=defaults.temperature, step=0.05, label="temperature (0 = greedy)",
                                                elem_id="temperature")
                        top_p = gr.Slider(0.05, 1, value=defaults.top_p, step=0.05, label="top_p", elem_id="top-p")
                        max_new = gr.Slider(1, Limits().max_new_tokens, value=defaults.max_new_tokens, step=1,
                                            label="max new tokens", elem_id="max-new-tokens")
                        rep = gr.Slider(0.5, 2, value=defaults.repetition_penalty, step=0.05,
                                        label="repetition penalty", elem_id="repetition-penalty")
                    with gr.Row():
                        seed = gr.Textbox(label="seed (blank: a fresh draw each time)", elem_id="seed")
                        enhance = gr.Checkbox(label="enhance (contrast x1.2, brightness x1.1)", elem_id="enhance")
                        cache = gr.Radio(["use", "skip", "refresh"], value="use", label="cache", elem_id="cache")
                        structured = gr.Checkbox(label="answer as the product schema (JSON: category, brand, colour, "
                                                 "spec, text)", elem_id="structured")
            with gr.Tab("History", id="history"):
                gr.Markdown("This session's questions and answers, newest first. Select a row to reopen it in Ask.")
                history_tbl = gr.Dataframe(headers=["time", "photo", "question", "answer", "cache"], interactive=False,
                                           elem_id="history-table")
                with gr.Row():
                    export_btn = gr.Button("Export as JSONL", elem_id="history-export")
                    history_file = gr.File(label="history.jsonl", interactive=False, elem_id="history-file")
                history_note = gr.Markdown(elem_id="history-note")
            with gr.Tab("Batch", id="batch"):
                gr.Markdown("One question about many photos, asked with `shelfsight batch`'s resumable code; "
                            "the generation controls of the Ask tab apply.")
                with gr.Row():
                    uploads = gr.File(label="Photos or a zip of them", file_count="multiple", elem_id="batch-files")
                    batch_q = gr.Textbox(label="Question", value=BATCH_QUESTION, lines=3, elem_id="batch-question")
                batch_go = gr.Button("Ask about every photo", variant="primary", elem_id="batch-button")
                progress = gr.HTML(elem_id="batch-status")
                batch_note = gr.Markdown(elem_id="batch-note", elem_classes="error-note")
                batch_tbl = gr.Dataframe(headers=batch.COLUMNS, interactive=False, wrap=True, elem_id="batch-table")
                with gr.Row():
                    csv_btn = gr.DownloadButton("Download CSV", interactive=False, elem_id="batch-csv")
                    jsonl_btn = gr.DownloadButton("Download JSONL", interactive=False, elem_id="batch-jsonl")
            with gr.Tab("Search", id="search"):
                catalog_line = gr.Markdown(elem_id="catalog-info")
                with gr.Row():
                    with gr.Column(scale=1):
                        search_photo = photo_box(label="Search by photo (optional)", sources=["upload", "clipboard"],
                                                 elem_id="search-photo", height=220)
                    with gr.Column(scale=2):
                        search_words = gr.Textbox(label="Search by words (optional)", elem_id="search-text")
                        with gr.Row():
                            search_k = gr.Number(label="hits", value=10, precision=0, elem_id="search-top-k")
                            search_rerank = gr.Number(label="rerank the first N (0: off)", value=0, precision=0,
                                                      elem_id="search-rerank")
                        search_filters = gr.Textbox(label="Filters: key=value, comma-separated (e.g. brand=Acme)",
                                                    elem_id="search-filters")
                        search_go = gr.Button("Search", variant="primary", elem_id="search-button")
                        search_note = gr.Markdown(elem_id="search-note", elem_classes="error-note")
                search_meta = gr.Markdown(elem_id="search-meta")
                search_gallery = gr.Gallery(label="Results", columns=5, height=260, elem_id="search-gallery")
                search_tbl = gr.Dataframe(headers=search.COLUMNS, interactive=False, wrap=True, elem_id="search-table")
            with gr.Tab("Evaluate", id="evaluate"):
                gr.Markdown("Score the served model on a dataset folder (`shelfsight dataset synth --out DIR` makes "
                            "one) with the study's settings, then compare two runs.")
                with gr.Row():
                    data_dir = gr.Textbox(label="Dataset folder (on the UI's machine)", elem_id="eval-dataset")
                    study_tokens = STUDY_SETTINGS["max_new_tokens"]
                    eval_tokens = gr.Number(label=f"max new tokens (blank: the study's {study_tokens})", precision=0,
                                            elem_id="eval-tokens")
                eval_go = gr.Button("Evaluate", variant="primary", elem_id="eval-button")
                eval_status = gr.HTML(elem_id="eval-status")
                eval_report = gr.Markdown(elem_id="eval-report")
                gr.Markdown("### Two runs side by side")
                with gr.Row():
                    run_a = gr.Dropdown(label="Run A", choices=[], allow_custom_value=True, elem_id="run-a")
                    run_b = gr.Dropdown(label="Run B", choices=[], allow_custom_value=True, elem_id="run-b")
                cmp_go = gr.Button("Compare", elem_id="compare-button")
                cmp_md = gr.Markdown(elem_id="compare")
                with gr.Row():
                    report_a, report_b = gr.Markdown(elem_id="report-a"), gr.Markdown(elem_id="report-b")

        controls = [temperature, top_p, max_new, rep, seed, enhance, cache, structured]  # ask.Controls' field order
        page.load(gateway_status, outputs=status, queue=False, show_progress="hidden")
        gr.Timer(settings.health_interval).tick(gateway_status, outputs=status, queue=False, show_progress="hidden")
        photo.change(show_photo, [photo, enhance], [seen, photo_note], queue=False, show_progress="hidden")
        enhance.change(show_photo, [photo, enhance], [seen, photo_note], queue=False, show_progress="hidden")
        preset.select(lambda name: (ask.PRESETS[name], name == ask.STRUCTURED), preset, [question, structured],
                      queue=False)
        go.click(run_ask, [photo, question, *controls, history],
                 [answer_md, answer_text, json_tbl, meta, error, history, history_tbl], show_progress_on=[answer_md])
        history_tbl.select(reopen, history, [photo, question, answer_md, answer_text, meta, *controls, tabs])
        export_btn.click(export_history, history, [history_file, history_note])
        uploads.change(lambda: None, None, batch_folder, queue=False)  # new photos: a new batch
        batch_go.click(run_batch, [uploads, batch_q, *controls, batch_folder],
                       [progress, batch_tbl, batch_note, csv_btn, jsonl_btn, batch_folder], show_progress="hidden")
        search_go.click(run_search, [search_photo, search_words, search_k, search_filters, search_rerank],
                        [search_gallery, search_tbl, search_meta, search_note], show_progress_on=[search_tbl])
        page.load(lambda: search.index_line(target, settings.timeout), outputs=catalog_line, show_progress="hidden")
        search_go.click(lambda: search.index_line(target, settings.timeout), outputs=catalog_line,
                        show_progress="hidden")
        eval_go.click(run_eval, [data_dir, eval_tokens], [eval_status, eval_report, run_a, run_b],
                      show_progress="hidden")
        cmp_go.click(run_compare, [run_a, run_b], [cmp_md, report_a, report_b], show_progress="hidden")
    page.workdir = workdir
    return page


def launch(settings: UISettings, block: bool = True) -> gr.Blocks:
    """Serve the page; block=False returns once it listens (page.local_url says where)."""
    page = build(settings)
    port = settings.port or _free_port()
    try:
        page.queue(default_concurrency_limit=8).launch(
            server_name=settings.host, server_port=port, prevent_thread_lock=not block,
            quiet=True, show_error=False, ssr_mode=False, mcp_server=False, pwa=False, enable_monitoring=False,
            footer_links=["settings"], allowed_paths=[str(page.workdir)], css=CSS,
            auth=list(settings.auth) or None)
    except OSError as e:  # Gradio: "Cannot find empty port..." when the port is taken
        raise errors.FailedPrecondition(f"the web UI cannot listen on {settings.host}:{port} ({e})") from None
    return page


def _free_port() -> int:
    from shelfsight.serving.tritonserver import free_port

    return free_port()
