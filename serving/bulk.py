"""Bulk scoring: a file of texts of any size in, one JSON line per text out, resumable.

``make predict INPUT=texts.jsonl OUTPUT=out.jsonl`` (or ``python -m serving.bulk INPUT OUTPUT``)
sends the texts through the gateway of ``make serve``, 64 a request (:mod:`serving.emotion_client`),
``--concurrency`` requests at a time; with ``LOCAL=1`` (``--local``) it runs the archive's handler
in this process instead, no server needed.

Input, by its suffix: ``.txt`` (one text a line), ``.csv`` (a header row; the text in column
``text``, the id in ``id`` when there is one) or ``.jsonl`` (one object a line, ``{"text": ...}``
and an optional ``"id"``). A row without an id gets its line number (``.csv``: its row number).
Output: one JSON line per input row, in input order: ``{"id", "label", "score", "probabilities",
"truncated", "abstained"}``, or ``{"id", "error": {"code", "type", "message"}}`` for a row that
failed (a text the service refused, a row that is no text, a request that failed).

Memory stays constant: the input is read as a stream, and at most ``concurrency`` requests are in
flight. Rows are written in order, a request's rows at once, each line whole: after Ctrl-C, a kill
or a crash, the same command resumes. It keeps the complete lines written (a last line cut short is
removed), checks that they are the input's first rows, and goes on after them: no row is skipped,
none is written twice. The exit code is 1 when any row of the output failed (the failed ids are
listed on stderr), 2 for a usage error, 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import os
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from project import ARCHIVE, GATEWAY_URL, SERVE_DIR
from serving.emotion_client import MAX_TEXTS, EmotionAPIError, EmotionClient, Prediction, PredictionError

SUFFIXES = (".txt", ".csv", ".jsonl")
SHOWN_FAILURES = 20
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

Row = tuple[Any, Any]  # (id, text: a str, or the reason the row is no text)


def read_rows(path: Path, text_field: str = "text", id_field: str = "id") -> Iterator[Row]:
    """The rows of ``path`` as ``(id, text)``, streamed; a row that holds no text has its reason
    (a ``ValueError``) in place of the text."""
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8", newline="" if suffix == ".csv" else None, errors="surrogateescape") as lines:
        if suffix == ".txt":
            for number, line in enumerate(lines, 1):
                yield number, line.rstrip("\r\n")
        elif suffix == ".csv":
            reader = csv.DictReader(lines)
            if text_field not in (reader.fieldnames or []):
                raise ValueError(f"{path}: no column {text_field!r} in the header {reader.fieldnames}")
            for number, record in enumerate(reader, 1):
                yield record.get(id_field) or number, record[text_field]
        else:
            for number, line in enumerate(lines, 1):
                try:
                    record = json.loads(line)
                except ValueError as err:
                    yield number, ValueError(f"line {number} is not JSON: {err}")
                    continue
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    yield number, ValueError(f"line {number} has no string {text_field!r}")
                    continue
                yield record.get(id_field, number), record[text_field]


def count_lines(path: Path) -> int:
    """Newlines in ``path``, read in blocks (the progress bar's total)."""
    with path.open("rb") as data:
        return sum(block.count(b"\n") for block in iter(lambda: data.read(1 << 20), b""))


def resume_point(output: Path) -> tuple[int, Any, list[tuple[Any, str]], int]:
    """What ``output`` already holds: its complete lines (a last line cut short is removed from the
    file), the last one's id, the failed rows among them (the first ``SHOWN_FAILURES``) and their
    number."""
    if not output.exists():
        return 0, None, [], 0
    with output.open("rb+") as data:
        data.seek(0, os.SEEK_END)
        end = data.tell()
        position = end
        while position > 0:  # back to the last newline
            step = min(65536, position)
            data.seek(position - step)
            block = data.read(step)
            cut = block.rfind(b"\n")
            if cut >= 0:
                position = position - step + cut + 1
                break
            position -= step
        if position != end:
            data.truncate(position)
    done, last, failures, failed = 0, None, [], 0
    with output.open(encoding="utf-8") as lines:
        for line in lines:
            row = json.loads(line)
            done, last = done + 1, row["id"]
            if "error" in row:
                failed += 1
                if len(failures) < SHOWN_FAILURES:
                    failures.append((row["id"], row["error"]["message"]))
    return done, last, failures, failed


def answer_line(row_id: Any, answer: Prediction | PredictionError) -> dict[str, Any]:
    if isinstance(answer, PredictionError):
        return {"id": row_id, "error": {"code": answer.code, "type": answer.type, "message": answer.message}}
    return {
        "id": row_id,
        "label": answer.label,
        "score": answer.score,
        "probabilities": answer.probabilities,
        "truncated": answer.truncated,
        "abstained": answer.abstained,
    }


def score_chunk(predict: Callable[[list[str]], list], rows: list[Row]) -> list[dict[str, Any]]:
    """The output lines of ``rows``: the texts sent as one list, the rows that are no text failed."""
    texts = [(i, text) for i, (_, text) in enumerate(rows) if isinstance(text, str)]
    answers: dict[int, Prediction | PredictionError] = {}
    if texts:
        try:
            answers = dict(zip([i for i, _ in texts], predict([t for _, t in texts]), strict=True))
        except EmotionAPIError as err:  # the whole request was refused: each of its rows failed
            answers = {i: PredictionError(err.status, err.type or "RequestFailed", err.message) for i, _ in texts}
    lines = []
    for i, (row_id, text) in enumerate(rows):
        if i in answers:
            lines.append(answer_line(row_id, answers[i]))
        else:
            lines.append(answer_line(row_id, PredictionError(400, "InvalidRow", str(text))))
    return lines


class LocalPredictor:
    """The archive's handler in this process (``--local``), answering lists like the gateway."""

    def __init__(self, archive: Path, workdir: Path) -> None:
        from serving.worker import InProcessWorker

        self.worker = InProcessWorker.from_archive(archive, workdir)

    def __call__(self, texts: list[str]) -> list[Prediction | PredictionError]:
        ((status, body),) = self.worker.run([({"texts": texts}, "application/json")])
        if status != 200:
            raise EmotionAPIError(status, body, body.get("request_id"))
        return [
            PredictionError(a["code"], a["type"], a["message"]) if "code" in a else Prediction.from_json(a)
            for a in body["predictions"]
        ]


def run(rows: Iterator[Row], predict: Callable, output: Path, concurrency: int, progress: tqdm) -> int:
    """Score ``rows`` into ``output`` (appended), in order, ``concurrency`` lists in flight;
    returns the rows that failed."""
    failed = 0
    chunks = iter(lambda: list(itertools.islice(rows, MAX_TEXTS)), [])
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max(1, concurrency)) as pool, output.open("a", encoding="utf-8") as out:

        def write(future: Future) -> None:
            nonlocal failed
            lines = future.result()
            out.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
            out.flush()
            failed += sum("error" in line for line in lines)
            progress.update(len(lines))

        try:
            for chunk in chunks:
                pending.append(pool.submit(score_chunk, predict, chunk))
                if len(pending) >= concurrency:
                    write(pending.popleft())
            while pending:
                write(pending.popleft())
        finally:
            for future in pending:
                future.cancel()
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path, help=f"texts: {', '.join(SUFFIXES)}")
    parser.add_argument("output", type=Path, help="answers, one JSON line per input row (resumed when it exists)")
    parser.add_argument("--url", default=GATEWAY_URL, help="the gateway (default %(default)s)")
    parser.add_argument("--key-file", type=Path, default=SERVE_DIR / "keys.json", help="gateway keys (make serve's)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (of 64 texts each)")
    parser.add_argument("--local", action="store_true", help="run the archive's handler here, no server")
    parser.add_argument("--archive", type=Path, default=ARCHIVE, help="the archive --local runs")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--id-field", default="id")
    args = parser.parse_args(argv)
    if args.input.suffix.lower() not in SUFFIXES or not args.input.is_file():
        print(f"{args.input}: not a {', '.join(SUFFIXES)} file", file=sys.stderr)
        return EXIT_USAGE
    if args.local and not args.archive.is_file():
        print(f"no archive at {args.archive}: make archive", file=sys.stderr)
        return EXIT_USAGE
    done, last, _, failed_before = resume_point(args.output)
    rows = read_rows(args.input, args.text_field, args.id_field)
    try:
        seen, resumed = 0, None
        for row in itertools.islice(rows, done):  # the rows already answered, not kept
            seen, resumed = seen + 1, row
    except ValueError as err:
        print(err, file=sys.stderr)
        return EXIT_USAGE
    if seen != done or (done and resumed[0] != last):
        print(f"{args.output} does not hold the first rows of {args.input}: use another output", file=sys.stderr)
        return EXIT_USAGE
    total = count_lines(args.input) - (1 if args.input.suffix.lower() == ".csv" else 0)
    progress = tqdm(total=max(total, done), initial=done, unit="text", desc="predict", file=sys.stderr)
    with contextlib.ExitStack() as stack:
        if args.local:
            predict: Callable = LocalPredictor(args.archive, Path(stack.enter_context(tempfile.TemporaryDirectory())))
        else:
            client = stack.enter_context(EmotionClient(args.url, key_file=args.key_file))
            predict = client.predict_list
        try:
            failed = failed_before + run(rows, predict, args.output, args.concurrency, progress)
        except KeyboardInterrupt:
            progress.close()
            print(f"\ninterrupted: {args.output} holds whole lines; run the same command to resume", file=sys.stderr)
            return EXIT_INTERRUPTED
        progress.close()
    if failed:
        _, _, failures, _ = resume_point(args.output)
        print(f"{failed} row(s) failed:", file=sys.stderr)
        for row_id, message in failures:
            print(f"  id {row_id}: {message}", file=sys.stderr)
        if failed > len(failures):
            print(f'  ... and {failed - len(failures)} more (rows with "error" in {args.output})', file=sys.stderr)
        return EXIT_FAILED
    print(f"{args.output}: every row answered", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
