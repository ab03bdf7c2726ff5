"""Admin pages on the server side (no browser): the login gate, roles, CSRF, 404s, the schema, and
what the job and playground pages render."""

import re
from datetime import timedelta

import pytest

from app import auth, jobs
from app.models import ApiKey, WebhookDelivery, utcnow
from tests.admin.conftest import add_checkpoint, add_running_job

PAGES = ["/admin", "/admin/adapters", "/admin/adapters/abc", "/admin/jobs", "/admin/jobs/new", "/admin/jobs/abc",
         "/admin/playground"]


@pytest.fixture
def keyed(make_client, tiny_base):
    client = make_client(tiny_base)
    with client.app.state.runtime.sessions() as session:
        _, client.inference_key = auth.create_key(session, "inference", "app")
        _, client.admin_key = auth.create_key(session, "admin", "ops")
    return client


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def log_in(client, key: str, next_: str = "/admin", token: str | None = None):
    form = client.get("/admin/login", follow_redirects=False)
    assert form.status_code == 200, form.status_code
    return client.post("/admin/login", data={"api_key": key, "csrf_token": token or csrf_of(form.text), "next": next_},
                       follow_redirects=False)


def test_revoking_the_admin_key_ends_its_browser_session(keyed):
    assert log_in(keyed, keyed.admin_key).status_code == 303
    overview = keyed.get("/admin", follow_redirects=False)
    assert overview.status_code == 200
    headers = {"X-CSRF-Token": csrf_of(overview.text)}
    assert keyed.delete("/adapters/missing", headers=headers).status_code == 404  # the session may manage
    with keyed.app.state.runtime.sessions() as session:
        session.delete(session.get(ApiKey, keyed.admin_key.split("_")[1]))
        session.commit()
    assert keyed.get("/admin", follow_redirects=False).status_code == 303
    assert keyed.delete("/adapters/missing", headers=headers).status_code == 401


@pytest.mark.parametrize("path", PAGES)
def test_logged_out_browsers_are_sent_to_the_login_form(keyed, path):
    response = keyed.get(path, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/admin/login?next=" + path.replace("/", "%2F")


def test_login_needs_the_forms_csrf_token_and_an_admin_key(keyed):
    assert log_in(keyed, keyed.admin_key, token="forged").status_code == 403
    refused = log_in(keyed, "ssk_000000000000_wrong")
    assert refused.status_code == 401 and "That key is not valid." in refused.text
    refused = log_in(keyed, keyed.inference_key)
    assert refused.status_code == 403 and "inference key" in refused.text
    assert keyed.get("/admin", follow_redirects=False).status_code == 303

    accepted = log_in(keyed, keyed.admin_key, next_="/admin/jobs?status=failed")
    assert (accepted.status_code, accepted.headers["location"]) == (303, "/admin/jobs?status=failed")
    overview = keyed.get("/admin")
    assert overview.status_code == 200
    assert '<span class="who-key" title="Signed in with this admin key">ops</span>' in overview.text
    assert "open mode" not in overview.text
    assert keyed.get("/admin/login", follow_redirects=False).headers["location"] == "/admin"  # already in

    keyed.post("/admin/logout", data={"csrf_token": "forged"})
    assert keyed.get("/admin", follow_redirects=False).status_code == 200  # a forged logout does nothing
    keyed.post("/admin/logout", data={"csrf_token": csrf_of(overview.text)})
    assert keyed.get("/admin", follow_redirects=False).status_code == 303


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/admin", "/docs"])
def test_login_never_redirects_out_of_the_admin_pages(keyed, target):
    response = log_in(keyed, keyed.admin_key, next_=target)
    assert (response.status_code, response.headers["location"]) == (303, "/admin")


def test_an_inference_key_gets_a_403_page(keyed):
    response = keyed.get("/admin/adapters", headers={"Authorization": f"Bearer {keyed.inference_key}"})
    assert response.status_code == 403 and response.headers["content-type"].startswith("text/html")
    assert "need an admin key" in response.text
    admin = keyed.get("/admin/adapters", headers={"Authorization": f"Bearer {keyed.admin_key}"})
    assert admin.status_code == 200


def test_open_mode_serves_the_pages_and_says_so(make_client, tiny_base):
    client = make_client(tiny_base)
    for path in ["/admin", "/admin/adapters", "/admin/jobs", "/admin/jobs/new", "/admin/playground"]:
        response = client.get(path)
        assert response.status_code == 200 and "open mode" in response.text, path
    assert client.get("/admin/login", follow_redirects=False).headers["location"] == "/admin"


@pytest.mark.parametrize("path, what", [("/admin/adapters/0123456789ab", "Adapter 0123456789ab"),
                                        ("/admin/jobs/0123456789ab", "Training job 0123456789ab")])
def test_unknown_adapter_and_job_pages_are_404_pages(make_client, tiny_base, path, what):
    response = make_client(tiny_base).get(path)
    assert response.status_code == 404 and response.headers["content-type"].startswith("text/html")
    assert f"{what} does not exist" in response.text


@pytest.mark.parametrize("query", ["page=0", "per_page=5000", "status=exploded"])
def test_bad_page_parameters_get_an_html_error(make_client, tiny_base, query):
    response = make_client(tiny_base).get(f"/admin/jobs?{query}")
    assert response.status_code == 422 and "Invalid address" in response.text


def test_admin_pages_stay_out_of_the_api_schema_and_static_files_are_served(make_client, tiny_base):
    client = make_client(tiny_base)
    assert not [path for path in client.app.openapi()["paths"] if path.startswith("/admin")]
    for name, kind in [("admin.css", "text/css"), ("admin.js", "javascript"), ("chart.js", "javascript")]:
        response = client.get(f"/admin/static/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"], name


def test_the_overview_shows_the_engine_its_caches_and_recent_latency(make_client, tiny_base):
    client = make_client(tiny_base, kv_cache_tokens=2048, prefix_cache_tokens=256)
    for _ in range(2):
        assert client.post("/generate", json={"prompt": "a fine film", "max_new_tokens": 3}).status_code == 200
    page = client.get("/admin").text
    stats = client.get("/health").json()["engine"]
    held = stats["kv_cache"]["used_tokens"]
    assert held > 0 and f"{held} positions held, 0 promised, of 2,048" in page
    assert "1 cached" in page and "of 256 positions" in page  # the base model's prefix
    assert "median" in page and "2 requests, last minute" in page  # queue, first token, engine time
    assert "idle" in page and "0 training work items run on this model" in page


def test_the_overview_names_the_int8_kernels_chosen_at_load(make_client, tiny_base):
    import dataclasses

    kernels = "cpu: fbgemm int8, rows split by sign (exact without VNNI)"
    client = make_client(dataclasses.replace(tiny_base, quantization="int8", int8_kernels=kernels))
    with client.app.state.runtime.sessions() as session:
        _, admin_key = auth.create_key(session, "admin", "ops")
    log_in(client, admin_key)
    page = client.get("/admin")
    assert page.status_code == 200 and "<dt>int8 kernels</dt><dd>" + kernels + "</dd>" in page.text
    assert client.get("/health").json()["int8_kernels"] == kernels


def button_shown(page: str, button: str) -> bool:
    tag = re.search(rf'<button [^>]*id="{button}"[^>]*>', page).group(0)
    return " hidden" not in tag


def test_the_job_page_shows_checkpoints_deliveries_and_the_buttons_each_state_allows(make_client, tiny_base):
    client = make_client(tiny_base)
    runtime = client.app.state.runtime
    job_id = add_running_job(runtime, "sst2-checkpointed")
    best = add_checkpoint(runtime, job_id, 20, {"eval_loss": 0.4321, "eval_accuracy": 0.875, "train_loss": 0.5})
    later = add_checkpoint(runtime, job_id, 30, {"eval_loss": 0.4012, "eval_accuracy": 0.9, "train_loss": None})
    soon = utcnow() + timedelta(minutes=5)
    with runtime.sessions() as session:
        session.add_all([
            WebhookDelivery(id="msg_given_up", job_id=job_id, event_type="fine_tuning.job.paused", payload={},
                            url="https://hooks.example.com/path?token=s3cret", status="failed", attempts=10,
                            last_error="HTTP 503"),
            WebhookDelivery(id="msg_waiting", job_id=job_id, event_type="fine_tuning.job.paused", payload={},
                            url="https://other.example.com/x", status="pending", attempts=2, next_attempt_at=soon,
                            last_error="connection refused"),
        ])
        session.commit()

    page = client.get(f"/admin/jobs/{job_id}").text
    checkpoints = page.split('id="checkpoints"')[1].split("</table>")[0]
    assert checkpoints.index(later) < checkpoints.index(best)  # newest first
    for text in ["0.4321", "87.5%", "0.4012", "90.0%", f'href="/admin/playground?adapter={best}"',
                 f'href="/admin/adapters/{later}"']:
        assert text in checkpoints, text
    assert 'id="checkpoints-empty" hidden' in page
    deliveries = page.split('id="deliveries"')[1].split("</table>")[0]
    for text in ["fine_tuning.job.paused", "https://hooks.example.com", "badge-failed", "HTTP 503", "given up",
                 "https://other.example.com", "badge-pending", "connection refused", f"next try {soon:%Y-%m-%d %H:%M:%S}"]:
        assert text in deliveries, text
    assert "s3cret" not in page and "/path" not in deliveries  # the target's origin only

    def buttons() -> tuple[bool, bool, bool]:
        page = client.get(f"/admin/jobs/{job_id}").text
        return tuple(button_shown(page, b) for b in ("pause-job", "resume-job", "cancel-job"))

    assert buttons() == (True, False, True)  # running
    with runtime.sessions() as session:
        jobs.request_pause(session, job_id)
    assert buttons() == (False, False, True)  # asked to pause: the run stops at its next step
    assert "running · pausing" in client.get(f"/admin/jobs/{job_id}").text
    with runtime.sessions() as session:
        assert jobs.pause_run(session, job_id, jobs.get_job(session, job_id).run_token, 30)
    assert buttons() == (False, True, True)  # paused
    with runtime.sessions() as session:
        assert jobs.resume(session, job_id)
    assert buttons() == (True, False, True)  # queued again
    assert client.post(f"/train-jobs/{job_id}/cancel").json()["status"] == "cancelled"
    assert buttons() == (False, False, False)


def test_a_job_without_checkpoints_or_deliveries_says_so(make_client, tiny_base):
    client = make_client(tiny_base)
    job_id = add_running_job(client.app.state.runtime, "fresh", done=0)
    page = client.get(f"/admin/jobs/{job_id}").text
    assert "No checkpoints yet" in page and "No webhook deliveries" in page
    assert 'id="checkpoints-empty" hidden' not in page and 'id="deliveries-empty" hidden' not in page


def test_the_jobs_list_filters_paused_jobs(make_client, tiny_base):
    client = make_client(tiny_base)
    runtime = client.app.state.runtime
    paused, queued = add_running_job(runtime, "paused-one"), add_running_job(runtime, "still-running")
    with runtime.sessions() as session:
        jobs.request_pause(session, paused)
        assert jobs.pause_run(session, paused, jobs.get_job(session, paused).run_token, 40)
    page = client.get("/admin/jobs?status=paused").text
    assert re.search(r'href="[^"]*status=paused[^"]*" aria-current="page">Paused <span class="tab-count">1</span>', page)
    assert f'data-job-id="{paused}"' in page and f'data-job-id="{queued}"' not in page


def test_the_playground_takes_a_checkpoint_by_id_and_says_when_one_is_gone(make_client, tiny_base):
    client = make_client(tiny_base)
    runtime = client.app.state.runtime
    job_id = add_running_job(runtime, "sst2-checkpointed")
    checkpoint = add_checkpoint(runtime, job_id, 10, {"eval_loss": 0.5, "eval_accuracy": 0.8})
    assert client.get("/adapters").json()["total"] == 0  # checkpoints are not in the adapter list...
    page = client.get(f"/admin/playground?adapter={checkpoint}").text
    assert f'<option value="{checkpoint}"' in page and "selected" in page.split(checkpoint)[1].split(">")[0]
    assert "missing-adapter" not in page
    page = client.get("/admin/playground?adapter=0123456789ab").text
    assert "Adapter <code>0123456789ab</code> does not exist" in page
