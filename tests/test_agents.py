"""Tests of rapo_nb.agents: simulated pool, context policies, and the OpenAI-compatible client against a local server."""
import asyncio, json, socket, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from rapo_nb.config import load_config, SPECIALISTS
from rapo_nb import agents as A
from rapo_nb.synthetic import generate_conversations, check_expected, extract_facts, TASK_SPECIALIST, Turn

CFG = load_config("full")


@pytest.fixture(scope="module")
def convs():
    return generate_conversations(80, 0, CFG)


@pytest.fixture(scope="module")
def pool():
    return A.SimulatedAgentPool(12, CFG, seed=0)


# ---------------------------------------------------------------- simulated pool
def test_true_skill_shape_and_specialists(pool):
    assert pool.true_skill.shape == (12, CFG.state.n_tasks, CFG.state.n_modalities)
    assert ((pool.true_skill >= 0) & (pool.true_skill <= 1)).all()
    assert sorted(np.bincount(pool.specialty, minlength=4)) == [3, 3, 3, 3]
    owner = np.array([SPECIALISTS.index(TASK_SPECIALIST[t]) for t in range(CFG.state.n_tasks)])
    for s in range(3):  # grammar, knowledge, reasoning specialists are best on their own tasks
        own = pool.true_skill[pool.specialty == s][:, owner == s].mean()
        others = pool.true_skill[pool.specialty != s][:, owner == s].mean()
        assert own > others + 0.2


def test_pool_seeded(pool):
    assert np.array_equal(A.SimulatedAgentPool(12, CFG, 0).true_skill, pool.true_skill)
    assert not np.allclose(A.SimulatedAgentPool(12, CFG, 1).true_skill, pool.true_skill)


def test_success_follows_hidden_skill(pool, convs):
    t = convs[0].turns[1]
    p = pool.true_skill[:, t.task, t.modality]
    rng = np.random.default_rng(0)
    for a in (int(p.argmax()), int(p.argmin())):
        n = 3000
        freq = np.mean([pool.respond(a, [], "", t, rng).success for _ in range(n)])
        assert abs(freq - p[a]) < 4 * np.sqrt(p[a] * (1 - p[a]) / n) + 1e-3


def test_responses_deterministic(pool, convs):
    c = convs[3]
    run = lambda: [pool.respond(i % 12, [], "", t, np.random.default_rng([5, i])) for i, t in enumerate(c.turns)]
    a, b = run(), run()
    assert [(r.text, r.latency_s, r.success) for r in a] == [(r.text, r.latency_s, r.success) for r in b]
    assert all(r.simulated for r in a)


def test_injected_failures_rate_and_mix(convs):
    t = convs[0].turns[1]
    p = A.SimulatedAgentPool(4, CFG, 0, failure_rate=0.2, failure_mix=(0.2, 0.3, 0.5), timeout_s=2.5)
    rng = np.random.default_rng(1)
    rs = [p.respond(0, [], "", t, rng) for _ in range(5000)]
    out = np.array([r.outcome for r in rs])
    assert abs((out != "ok").mean() - 0.2) < 0.025
    for kind, share in zip(("error", "timeout", "crash"), (0.2, 0.3, 0.5)):
        assert abs((out == kind).mean() - 0.2 * share) < 0.02
    assert all(r.latency_s == 2.5 and r.text == "" and not r.success for r in rs if r.outcome == "timeout")
    assert all(r.error for r in rs if r.outcome != "ok")
    clean = A.SimulatedAgentPool(4, CFG, 0)
    assert all(clean.respond(0, [], "", t, rng).outcome == "ok" for _ in range(500))


def test_pool_bad_arguments(pool, convs):
    t = convs[0].turns[1]
    with pytest.raises(ValueError, match="n_agents"): A.SimulatedAgentPool(0, CFG)
    with pytest.raises(ValueError, match="failure_rate"): A.SimulatedAgentPool(3, CFG, failure_rate=-0.1)
    with pytest.raises(ValueError, match="failure_mix"): A.SimulatedAgentPool(3, CFG, failure_mix=(1.0, 0.5, 0.0))
    with pytest.raises(ValueError, match="agent"): pool.respond(12, [], "", t, np.random.default_rng(0))
    bad = Turn(t.index, t.fsm_state, t.speaker, t.text, t.specialist, 99, t.modality)
    with pytest.raises(ValueError, match="turn.task"): pool.respond(0, [], "", bad, np.random.default_rng(0))
    with pytest.raises(ValueError, match="outcome"): A.AgentResponse("", 0.0, "boom", False, True)


def test_response_built_from_context_facts(pool, convs):
    "The conclusion restates the facts found in the handed context, and only those."
    c = next(c for c in convs if len(c.facts) >= 3)
    hist = [t.text for t in c.turns[:-1]]
    final = c.turns[-1]
    a = int(pool.true_skill[:, final.task, final.modality].argmax())
    seeds = [s for s in range(50) if pool.respond(a, [], "", final, np.random.default_rng(s)).success][:5]
    assert seeds
    for s in seeds:
        full = pool.respond(a, hist, A.full_history(hist), final, np.random.default_rng(s))
        assert all(f in full.text for f in c.facts)
        lossy_ctx = A.full_history(hist).replace(c.facts[0], "")
        lossy = pool.respond(a, hist, lossy_ctx, final, np.random.default_rng(s))
        assert c.facts[0] not in lossy.text and all(f in lossy.text for f in c.facts[1:])
        ideal = [" ".join(x) for x in c.expected["turn_focus"]]
        assert check_expected(c, ideal[:-1] + [full.text]) and not check_expected(c, ideal[:-1] + [lossy.text])


def test_response_mentions_focus_on_success(pool, convs):
    rng = np.random.default_rng(2)
    for c in convs[:20]:
        for t in c.turns:
            r = pool.respond(0, [], "", t, rng)
            focus = A.turn_focus(t)
            if r.success: assert all(e in r.text for e in focus)
            elif focus: assert not all(e in r.text for e in focus)


def test_latency_grows_with_context(pool, convs):
    t = convs[0].turns[1]
    short = pool.respond(0, [], "", t, np.random.default_rng(9))
    long = pool.respond(0, [], "word " * 5000, t, np.random.default_rng(9))
    assert long.latency_s > short.latency_s > 0


def test_history_not_modified(pool, convs):
    hist = [t.text for t in convs[1].turns[:-1]]; before = list(hist)
    pool.respond(0, hist, A.full_history(hist), convs[1].turns[-1], np.random.default_rng(0))
    assert hist == before


def test_simulated_agent_protocol(pool, convs):
    ag = pool.agent(3, seed=1)
    assert isinstance(ag, A.Agent)
    t = convs[0].turns[1]
    r1 = ag.respond([], "", t)
    r2 = asyncio.run(pool.agent(3, seed=1).arespond([], "", t))
    assert (r1.text, r1.success) == (r2.text, r2.success) and r1.simulated


# ---------------------------------------------------------------- context policies
def test_context_policies():
    from rapo_nb.synthetic import ENTITY_VOCAB
    a, b, c = ENTITY_VOCAB[:3]
    hist = [f"Fact: {a} funds {b} .", "ok", f"Fact: {b} owns {c} .", "fine", "next question please", "answer here"]
    assert A.full_history(hist) == "\n".join(hist)
    assert A.last_k(hist, 2) == "next question please\nanswer here" and A.last_k(hist, 0) == ""
    assert A.last_k(hist, 100) == A.full_history(hist)
    s = A.summary(hist, 15)
    assert len(s.split()) <= 15 and extract_facts(s) == [f"{a} funds {b}", f"{b} owns {c}"] and s.endswith("answer here")
    assert A.summary(hist, 3).split() == ["Facts:", a, "funds"]
    assert A.handover("last_k", hist, k=1) == "answer here"
    for bad, match in ((lambda: A.last_k(hist, -1), "k:"), (lambda: A.summary(hist, 0), "max_words"),
                       (lambda: A.handover("all", hist), "policy")):
        with pytest.raises(ValueError, match=match): bad()


def test_policies_change_outcomes(pool, convs):
    "Lossy handovers lower rule success (simulated, oracle routing)."
    succ = lambda pol, **kw: A.run_policy(convs[:60], pool, pol, 0, **kw).drop_duplicates("conv_id").rule_success.mean()
    full, cut, lossy = succ("full"), succ("last_k", k=2), succ("full", drop=0.5)
    assert full > cut + 0.1 and full > lossy + 0.1


# ---------------------------------------------------------------- OpenAI-compatible client
class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        srv = self.server
        with srv.lock:
            srv.calls += 1; n = srv.calls
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        srv.requests.append(dict(path=self.path, body=body, auth=self.headers.get("Authorization")))
        mode = srv.mode
        if mode == "slow": time.sleep(srv.delay)
        if mode == "5xx" or (mode == "5xx_then_ok" and n <= srv.fail_first): return self._send(503, b'{"error": "overloaded"}')
        if mode == "404": return self._send(404, b'{"error": "no such model"}')
        if mode == "malformed": return self._send(200, b'{"choices": [ {not json')
        if mode == "no_choices": return self._send(200, b'{"id": "x", "object": "chat.completion"}')
        content = "echo: " + body["messages"][-1]["content"]
        return self._send(200, json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode())

    def _send(self, status, payload):
        try:
            self.send_response(status); self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload))); self.end_headers(); self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError): pass  # the client gave up (timeout test)

    def log_message(self, *args): pass


@pytest.fixture
def server():
    "A chat-completions server on 127.0.0.1, on a free port, in a thread; behaviour set through .mode."
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.mode, srv.calls, srv.requests, srv.delay, srv.fail_first, srv.lock = "ok", 0, [], 1.0, 2, threading.Lock()
    th = threading.Thread(target=srv.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True); th.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    yield srv
    srv.shutdown(); srv.server_close(); th.join(5)


def _turn(convs):
    return convs[0].turns[1]


def _agent(server, **kw):
    return A.OpenAIChatAgent(server.base, "test-model", **{"api_key": "", "timeout": 5.0, "retries": 2, "backoff_s": 0.01, **kw})


def test_llm_success(server, convs):
    ag = _agent(server, api_key="sk-test")
    assert isinstance(ag, A.Agent)
    hist = ["hello", "hi, how can I help?"]; before = list(hist)
    r = ag.respond(hist, "handed context", _turn(convs))
    assert (r.outcome, r.success, r.simulated) == ("ok", True, False) and r.text.startswith("echo: ")
    assert hist == before
    req = server.requests[-1]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "test-model" and "handed context" in req["body"]["messages"][0]["content"]
    assert [m["content"] for m in req["body"]["messages"][1:]] == hist + [_turn(convs).text]


def test_llm_env_config(server, monkeypatch, convs):
    monkeypatch.setenv("RAPO_LLM_BASE_URL", server.base); monkeypatch.setenv("RAPO_LLM_MODEL", "env-model")
    monkeypatch.setenv("RAPO_LLM_API_KEY", "sk-env")
    ag = A.OpenAIChatAgent(timeout=5, retries=0)
    assert ag.respond([], "", _turn(convs)).outcome == "ok"
    assert server.requests[-1]["body"]["model"] == "env-model" and server.requests[-1]["auth"] == "Bearer sk-env"


def test_llm_config_errors(monkeypatch):
    for k in ("RAPO_LLM_BASE_URL", "RAPO_LLM_MODEL", "RAPO_LLM_API_KEY"): monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="base_url"): A.OpenAIChatAgent(model="m")
    with pytest.raises(ValueError, match="model"): A.OpenAIChatAgent("http://127.0.0.1:1/v1")
    with pytest.raises(ValueError, match="base_url"): A.OpenAIChatAgent("127.0.0.1:1/v1", "m")
    with pytest.raises(ValueError, match="timeout"): A.OpenAIChatAgent("http://127.0.0.1:1/v1", "m", timeout=0)
    with pytest.raises(ValueError, match="retries"): A.OpenAIChatAgent("http://127.0.0.1:1/v1", "m", retries=-1)


def test_llm_timeout(server, convs):
    server.mode, server.delay = "slow", 1.0
    ag = _agent(server, timeout=0.2, retries=1)
    hist = ["a", "b"]; before = list(hist)
    with pytest.raises(A.LLMTimeout, match="no answer within 0.2 s") as ei:
        ag.complete(ag.messages(hist, "", _turn(convs)))
    assert ei.value.attempts == 2 and "after 2 attempts" in str(ei.value)
    r = ag.respond(hist, "", _turn(convs))
    assert r.outcome == "timeout" and not r.success and "no answer" in r.error and hist == before


def test_llm_5xx_then_success(server, convs):
    server.mode, server.fail_first = "5xx_then_ok", 2
    r = _agent(server, retries=2).respond([], "", _turn(convs))
    assert r.outcome == "ok" and server.calls == 3


def test_llm_5xx_forever(server, convs):
    server.mode = "5xx"
    ag = _agent(server, retries=2)
    with pytest.raises(A.LLMHTTPError, match="HTTP 503") as ei:
        ag.complete(ag.messages([], "", _turn(convs)))
    assert ei.value.status == 503 and ei.value.attempts == 3 and server.calls == 3 and "after 3 attempts" in str(ei.value)
    hist = ["x"]
    r = ag.respond(hist, "", _turn(convs))
    assert r.outcome == "error" and "HTTP 503" in r.error and hist == ["x"] and server.calls == 6


def test_llm_4xx_not_retried(server, convs):
    server.mode = "404"
    ag = _agent(server, retries=3)
    with pytest.raises(A.LLMHTTPError) as ei: ag.complete(ag.messages([], "", _turn(convs)))
    assert ei.value.status == 404 and server.calls == 1


@pytest.mark.parametrize("mode,msg", [("malformed", "malformed JSON"), ("no_choices", "without choices")])
def test_llm_bad_body(server, convs, mode, msg):
    server.mode = mode
    ag = _agent(server, retries=2)
    with pytest.raises(A.LLMBadResponse, match=msg): ag.complete(ag.messages([], "", _turn(convs)))
    assert server.calls == 1  # a broken body is not retried
    hist = ["kept"]
    r = ag.respond(hist, "", _turn(convs))
    assert r.outcome == "error" and msg in r.error and hist == ["kept"]


def test_llm_connection_refused(convs):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]  # closed on exit: nothing listens there
    ag = A.OpenAIChatAgent(f"http://127.0.0.1:{port}/v1", "m", api_key="", timeout=2, retries=1, backoff_s=0.01)
    with pytest.raises(A.LLMConnectionError, match="connection failed") as ei:
        ag.complete(ag.messages([], "", _turn(convs)))
    assert ei.value.attempts == 2
    hist = ["h1", "h2"]
    r = ag.respond(hist, "", _turn(convs))
    assert r.outcome == "error" and "connection failed" in r.error and hist == ["h1", "h2"]


def test_llm_async_paths(server, convs):
    ag = _agent(server, retries=1)
    r = asyncio.run(ag.arespond(["h"], "", _turn(convs)))
    assert r.outcome == "ok" and r.success
    server.mode = "5xx"
    r = asyncio.run(ag.arespond(["h"], "", _turn(convs)))
    assert r.outcome == "error" and "HTTP 503" in r.error and "after 2 attempts" in r.error
    server.mode, server.delay = "slow", 1.0
    r = asyncio.run(_agent(server, timeout=0.2, retries=0).arespond([], "", _turn(convs)))
    assert r.outcome == "timeout"


def test_lost_context_lowers_rouge_and_cosine(pool, convs):
    "§5.2/§4.3: deleting facts from the handed context lowers ROUGE-L and cosine between consecutive responses."
    from rouge_score import rouge_scorer
    from rapo_nb.state import default_encoder, cosine_rows
    sc, enc = rouge_scorer.RougeScorer(["rougeL"]), default_encoder()
    def scores(**kw):
        h = A.run_policy(convs[:60], pool, "full", 0, **kw)
        h = h[h.turn >= 0]
        rouge = np.mean([sc.score(p, q)["rougeL"].fmeasure for p, q in zip(h.prev_response, h.response)])
        cos = cosine_rows(enc.encode(list(h.prev_response)), enc.encode(list(h.response)))
        return rouge, cos.mean(), (cos > CFG.evaluation.handoff_cosine).mean()
    kept, lost = scores(), scores(drop=0.5)
    assert kept[0] > lost[0] + 0.05 and kept[1] > lost[1] + 0.05 and kept[2] > lost[2] + 0.1


def test_failed_answer_keeps_thread_but_not_focus(pool, convs):
    c = next(c for c in convs if len(c.facts) >= 2)
    hist = [t.text for t in c.turns[:4]]
    t = c.turns[4] if c.turns[4].fsm_state != "conclusion" else c.turns[1]
    u = __import__("rapo_nb.synthetic", fromlist=["Uniforms"]).Uniforms(np.random.default_rng(0))
    bad = A.compose_response(t, A.full_history(hist), u, ok=False)
    focus = A.turn_focus(t)
    assert focus and not any(e in bad.split() for e in focus)
    good = A.compose_response(t, A.full_history(hist), u, ok=True)
    assert all(e in good for e in focus)


def test_simulated_world_comes_from_the_config():
    "Skill levels, noise, clip range, latency model and timeout are read from cfg.simulation."
    flat = load_config("full", simulation__skill_levels=((0.5,) * 4,) * 4, simulation__skill_noise=0.0)
    assert np.allclose(A.SimulatedAgentPool(6, flat, seed=0).true_skill, 0.5)
    clipped = load_config("full", simulation__skill_range=(0.3, 0.6))
    ts = A.SimulatedAgentPool(6, clipped, seed=0).true_skill
    assert ts.min() >= 0.3 and ts.max() <= 0.6
    slow = load_config("full", simulation__latency_base_s=0.5, simulation__latency_per_token_s=0.0,
                       simulation__latency_per_context_token_s=0.0, simulation__timeout_s=3.0)
    assert A.service_time(100, 1000, 1.0, 1.0, slow) == pytest.approx(0.5)
    assert A.service_time(0, 0, 1.0, 1.0) == pytest.approx(CFG.simulation.latency_base_s)
    assert A.SimulatedAgentPool(3, slow).timeout_s == 3.0 and A.SimulatedAgentPool(3, CFG).timeout_s == CFG.simulation.timeout_s
    hist = [f"Fact: {a} funds {b} ." for a, b in zip("Kakaran Lokaran Mikaran Zekaran".split(), "Tukaran Rakaran Vokaran Nikaran".split())]
    assert A.summary(hist) == A.summary(hist, CFG.runtime.summary_max_words)


def test_last_k_for_every_k_including_histories_shorter_than_k():
    from rapo_nb.agents import last_k
    h = ["a", "b"]
    assert [last_k(h, k) for k in range(5)] == ["", "b", "a\nb", "a\nb", "a\nb"]
