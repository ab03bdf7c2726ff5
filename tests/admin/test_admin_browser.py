"""The admin UI in a real headless Chromium against the real app over HTTP (tiny model)."""

import base64
import re

import httpx
from playwright.sync_api import expect
from sqlalchemy import insert

from app import auth, jobs
from app.models import Adapter, new_id
from tests.admin.conftest import (
    TEMPLATE,
    add_adapter,
    add_checkpoint,
    add_running_job,
    open_page,
    record_progress,
    screenshot,
)
from tests.conftest import DATASETS
from tests.webhook_listener import Listener

METRICS = {"eval_accuracy": 0.884, "eval_loss": 0.3127, "steps": 425, "best_step": 400, "duration_s": 900.2,
           "stopped_early": False}


def test_every_page_shows_its_content_without_console_errors(make_live_server, tiny_base, browser):
    server = make_live_server(tiny_base)
    runtime = server.runtime
    page, console = open_page(browser, server)

    # Empty states first, on the fresh server.
    for path, name, text in [("/admin", "overview_empty", "No adapters yet."),
                             ("/admin/adapters", "adapters_empty", "No adapters yet."),
                             ("/admin/jobs", "jobs_empty", "No training jobs yet."),
                             ("/admin/playground", "playground_empty", "No adapters to try yet.")]:
        page.goto(path, wait_until="networkidle")
        expect(page.locator("main")).to_contain_text(text)
        expect(page.locator(".badge-open")).to_have_text("open mode")
        screenshot(page, name)

    sentiment = add_adapter(runtime, "sst2-sentiment", tokens=20, metrics=METRICS)
    add_adapter(runtime, "agnews-topics", tokens=12, seed=1, metrics={"eval_accuracy": 0.71})
    imported = add_adapter(runtime, "imported-from-peft", seed=2, source="imported", template=None)
    job_id = add_running_job(runtime, "sst2-sentiment-v2")
    with runtime.sessions() as session:
        record_progress(session, add_running_job(runtime, "finished-job", total=20, done=0), range(1, 21), 20, 10)

    page.goto("/admin", wait_until="networkidle")
    main = page.locator("main")
    for text in ["Base model", runtime.base.fingerprint, "fp32", "cpu", "Model weights", "Process RSS",
                 "Adapter cache", "tokens/s", "sst2-sentiment", "sst2-sentiment-v2"]:
        expect(main).to_contain_text(text)
    expect(page.locator(".big-number").first).to_have_text("3")
    expect(page.locator(".status-counts .badge-running")).to_have_text("running 2")
    screenshot(page, "overview")

    page.goto("/admin/adapters", wait_until="networkidle")
    rows = page.locator("#adapters tbody tr")
    expect(rows).to_have_count(3)
    expect(rows.first).to_contain_text("imported-from-peft")  # newest first
    expect(page.locator(f"tr[data-adapter-id='{sentiment.id}']")).to_contain_text("88.4%")
    page.locator("th a", has_text="Name").click()
    expect(rows.first).to_contain_text("agnews-topics")
    expect(page.locator("th[aria-sort='ascending']")).to_contain_text("Name")
    page.fill("input[name=q]", "SST2")
    page.click("form.search button")
    expect(rows).to_have_count(1)
    screenshot(page, "adapters_search")
    page.goto("/admin/adapters", wait_until="networkidle")
    screenshot(page, "adapters")

    page.goto(f"/admin/adapters/{sentiment.id}", wait_until="networkidle")
    for text in [sentiment.id, sentiment.sha256, "matches the served model", "Review: {input}", "88.4%", "0.3127",
                 "900.2 s", "stopped early"]:
        expect(main).to_contain_text(text)
    download = page.request.get(page.get_attribute("a[download]", "href"))
    assert download.status == 200 and download.headers["content-type"] == "application/zip"
    screenshot(page, "adapter_detail")
    page.goto(f"/admin/adapters/{imported.id}", wait_until="networkidle")
    expect(main).to_contain_text("No template.")

    page.goto("/admin/jobs", wait_until="networkidle")
    job_row = page.locator(f"tr[data-job-id='{job_id}']")
    expect(job_row.locator("[data-field=status]")).to_have_text("running")
    expect(job_row.locator(".progress-text")).to_have_text("40 / 60")
    screenshot(page, "jobs")

    page.goto(f"/admin/jobs/{job_id}", wait_until="networkidle")
    expect(page.locator("#loss-chart polyline")).to_have_count(2)  # train and eval loss
    expect(page.locator("#accuracy-chart circle")).to_have_count(4)  # one per evaluation
    expect(page.locator("[data-field=eval_accuracy]")).to_have_text("90.0%")
    expect(page.locator("#events tbody")).to_contain_text("started on test-worker")
    expect(page.locator("#events tbody")).to_contain_text("accuracy 90.0%")
    expect(page.locator("#events tbody tr.event-train")).to_have_count(0)
    page.check("#show-train-events")
    expect(page.locator("#events tbody tr.event-train")).to_have_count(40)
    page.uncheck("#show-train-events")
    expect(page.locator("#cancel-job")).to_be_visible()
    screenshot(page, "job_detail")

    page.goto("/admin/jobs/new", wait_until="networkidle")
    expect(page.locator("#f-template")).to_have_value("{input}")
    expect(page.locator("#f-num_virtual_tokens")).to_have_value("20")
    screenshot(page, "job_new")

    page.goto(f"/admin/playground?adapter={sentiment.id}", wait_until="networkidle")
    expect(page.locator("#adapter")).to_have_value(sentiment.id)
    expect(page.locator("#template-preview")).to_have_text(TEMPLATE)
    screenshot(page, "playground")

    with runtime.sessions() as session:  # rows only (no files): enough for the table to page
        session.execute(insert(Adapter), [
            dict(id=f"{i:012x}", name=f"bulk-{i:02d}", base_fingerprint=runtime.base.fingerprint, num_virtual_tokens=20,
                 sha256="0" * 64, size_bytes=5544, source="trained", metrics={"eval_accuracy": i / 60}, template=None)
            for i in range(60)])
        session.commit()
    page.goto("/admin/adapters?sort=-eval_accuracy&page=2", wait_until="networkidle")
    expect(page.locator(".pagination-summary")).to_have_text("21–40 of 63 adapters")
    expect(rows.first).to_contain_text("bulk-41")  # 20 rows above: bulk-59…42 and two seeded ones
    page.click("a[rel=next]")
    expect(page.locator(".page-link.current")).to_have_text("3")
    expect(rows.first).to_contain_text("bulk-21")
    screenshot(page, "adapters_paged")

    page.goto("/admin/adapters/does-not-exist", wait_until="networkidle")
    expect(main).to_contain_text("Adapter does-not-exist does not exist")
    screenshot(page, "not_found")
    # The 404 page is the one expected console error (Chromium logs the failed document load).
    assert [e for e in console.errors if "404" not in e] == [], console.errors


def test_job_form_shows_errors_starts_a_job_and_follows_it_live(make_live_server, tiny_base, browser, tmp_path):
    server = make_live_server(tiny_base)
    page, console = open_page(browser, server)
    good = tmp_path / "sst2-20.jsonl"
    good.write_text("".join((DATASETS / "sst2" / "train.jsonl").read_text().splitlines(keepends=True)[:20]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "fine", "output": "ok"}\nnot json\n{"input": "no output"}\n')

    page.goto("/admin/jobs/new", wait_until="networkidle")
    page.set_input_files("#f-file", str(bad))
    page.click("#submit-job")
    file_error = page.locator("[data-error-for=file]")
    expect(file_error).to_be_visible()
    expect(file_error).to_contain_text("2 problems in this file")
    expect(file_error.locator("li")).to_have_count(2)
    expect(file_error).to_contain_text("line 2")
    expect(file_error).to_contain_text("line 3")
    screenshot(page, "job_new_errors")

    page.set_input_files("#f-file", str(good))
    page.fill("#f-template", "Review: no placeholder")
    page.fill("#f-max_steps", "50")
    page.click("summary")
    page.fill("#f-batch_size", "0")
    page.click("#submit-job")
    expect(page.locator("[data-error-for=batch_size]")).to_contain_text("greater than or equal to 1")
    expect(page.locator("[data-error-for=file]")).to_be_hidden()
    page.fill("#f-batch_size", "4")
    page.click("#submit-job")
    expect(page.locator("[data-error-for=template]")).to_contain_text("must contain {input}")
    expect(page.locator("[data-error-for=batch_size]")).to_be_hidden()
    expect(page.locator("#f-template")).to_have_attribute("aria-invalid", "true")
    page.fill("#f-template", "Review: {input}\nSentiment:")
    page.fill("#f-name", "sst2-from-the-form")
    page.click("#submit-job")
    page.wait_for_url(re.compile(r"/admin/jobs/[0-9a-f]{12}$"))
    job_id = page.url.rsplit("/", 1)[1]
    expect(page.locator("h1")).to_contain_text("sst2-from-the-form")
    expect(page.locator("h1 [data-field=status]")).to_have_text("queued")
    job = httpx.get(f"{server.url}/train-jobs/{job_id}").json()
    assert (job["status"], job["train_examples"], job["params"]["max_steps"], job["params"]["batch_size"]) == (
        "queued", 20, 50, 4)

    page.goto("/admin/jobs", wait_until="networkidle")
    row = page.locator(f"tr[data-job-id='{job_id}']")
    expect(row.locator("[data-field=status]")).to_have_text("queued")
    # A worker picks it up: the list follows without a reload.
    with server.runtime.sessions() as session:
        assert jobs.claim(session, job_id, "test-worker")
        record_progress(session, job_id, range(1, 26), 50, 10)
    expect(row.locator("[data-field=status]")).to_have_text("running")
    expect(row.locator(".progress-text")).to_have_text("25 / 50")
    expect(row.locator(".progress-bar")).to_have_attribute("style", re.compile(r"width: 50%"))
    expect(row.locator("[data-field=eval_accuracy]")).to_have_text("70.0%")
    expect(page.locator("#jobs-changed")).to_be_hidden()
    with server.runtime.sessions() as session:  # a job the page does not show yet: it offers a refresh
        jobs.create_job(session, job_id="0123456789ab", name="another", params={}, dataset_path="datasets/x",
                        train_examples=1, validation_examples=0)
    expect(page.locator("#jobs-changed")).to_be_visible()

    page.goto(f"/admin/jobs/{job_id}", wait_until="networkidle")
    expect(page.locator("#accuracy-chart circle")).to_have_count(2)
    with server.runtime.sessions() as session:
        record_progress(session, job_id, range(26, 31), 50, 10)
    expect(page.locator("#accuracy-chart circle")).to_have_count(3)  # new events drawn live
    expect(page.locator(".stats .progress-text")).to_have_text("30 / 50")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#cancel-job")
    expect(page.locator("h1 [data-field=status]")).to_have_text("running · cancelling")
    with server.runtime.sessions() as session:
        jobs.finish(session, job_id, jobs.get_job(session, job_id).run_token, "cancelled", message="cancelled at step 30")
    expect(page.locator("h1 [data-field=status]")).to_have_text("cancelled")
    expect(page.locator("#cancel-job")).to_be_hidden()
    expect(page.locator("#events tbody")).to_contain_text("cancelled at step 30")
    # The three 422s were expected; nothing else may have gone wrong.
    assert [e for e in console.errors if "422" not in e] == [], console.errors


def test_playground_shows_what_generate_returns(make_live_server, tiny_base, browser):
    server = make_live_server(tiny_base)
    adapter = add_adapter(server.runtime, "sst2-sentiment", tokens=10, seed=3, metrics=METRICS)
    add_adapter(server.runtime, "other", seed=4)
    page, console = open_page(browser, server)
    page.goto("/admin/playground", wait_until="networkidle")
    page.fill("#adapter-search", "sst2")
    expect(page.locator("#adapter option")).to_have_count(1)
    expect(page.locator("#picker-note")).to_have_text("1 match.")
    page.select_option("#adapter", adapter.id)
    page.fill("#prompt", "a gorgeous, witty film")
    page.fill("#max_new_tokens", "12")

    def expected(**body) -> str:
        body = {"prompt": "a gorgeous, witty film", "max_new_tokens": 12, "temperature": 0} | body
        response = httpx.post(f"{server.url}/generate", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["text"]

    with_adapter = expected(adapter_id=adapter.id, apply_template=True)
    base_only = expected(adapter_id=None, prompt=TEMPLATE.replace("{input}", "a gorgeous, witty film"))
    assert with_adapter != base_only  # else the comparison below could not tell the panels apart
    for stream in (True, False):
        page.set_checked("#stream", stream)
        page.click("#run")
        for panel, text in (("#out-adapter", with_adapter), ("#out-base", base_only)):
            expect(page.locator(f"{panel} [data-role=meta]")).to_contain_text("finished:")
            assert page.locator(f"{panel} [data-role=text]").text_content() == text, (stream, panel)
    expect(page.locator("#out-adapter h2")).to_contain_text("sst2-sentiment")
    screenshot(page, "playground_result")

    page.uncheck("#apply_template")
    page.click("#run")
    expect(page.locator("#out-adapter [data-role=meta]")).to_contain_text("finished:")
    assert page.locator("#out-adapter [data-role=text]").text_content() == expected(adapter_id=adapter.id)
    assert console.errors == []


def test_deleting_an_adapter_asks_first_and_removes_it(make_live_server, tiny_base, browser):
    server = make_live_server(tiny_base)
    keep = add_adapter(server.runtime, "keep-me")
    doomed = add_adapter(server.runtime, "delete-me", seed=1)
    page, console = open_page(browser, server)
    page.goto("/admin/adapters", wait_until="networkidle")
    row = page.locator(f"tr[data-adapter-id='{doomed.id}']")

    page.once("dialog", lambda dialog: dialog.dismiss())
    row.locator("[data-delete-adapter]").click()
    expect(row).to_be_visible()
    assert httpx.get(f"{server.url}/adapters/{doomed.id}").status_code == 200

    messages = []
    page.once("dialog", lambda dialog: (messages.append(dialog.message), dialog.accept()))
    row.locator("[data-delete-adapter]").click()
    expect(row).to_have_count(0)
    expect(page.locator("#flash")).to_have_text("Deleted adapter “delete-me”.")
    assert "delete-me" in messages[0]
    expect(page.locator(f"tr[data-adapter-id='{keep.id}']")).to_be_visible()
    assert httpx.get(f"{server.url}/adapters/{doomed.id}").status_code == 404

    # From the detail page: back to the list afterwards.
    page.goto(f"/admin/adapters/{keep.id}", wait_until="networkidle")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("button[data-delete-adapter]")
    page.wait_for_url("**/admin/adapters")
    expect(page.locator("main")).to_contain_text("No adapters yet.")
    assert httpx.get(f"{server.url}/adapters/{keep.id}").status_code == 404
    assert console.errors == []


def test_login_with_api_keys(make_live_server, tiny_base, browser):
    server = make_live_server(tiny_base)
    adapter = add_adapter(server.runtime, "sst2-sentiment")
    with server.runtime.sessions() as session:
        _, inference_key = auth.create_key(session, "inference", "app")
        _, admin_key = auth.create_key(session, "admin", "ops")
    page, console = open_page(browser, server)

    page.goto("/admin/jobs?status=queued")
    assert page.url == f"{server.url}/admin/login?next=%2Fadmin%2Fjobs%3Fstatus%3Dqueued"
    screenshot(page, "login")

    def log_in(key: str) -> int:
        page.fill("#api_key", key)
        with page.expect_navigation() as navigation:
            page.click("button[type=submit]")
        return navigation.value.status

    assert log_in("ssk_000000000000_wrong") == 401
    expect(page.locator("#login-error")).to_have_text("That key is not valid.")
    assert log_in(inference_key) == 403
    expect(page.locator("#login-error")).to_contain_text("inference key")
    screenshot(page, "login_refused")
    assert log_in(admin_key) == 200
    assert page.url == f"{server.url}/admin/jobs?status=queued"  # back where it was going
    expect(page.locator(".who-key")).to_have_text("ops")
    expect(page.locator(".badge-open")).to_have_count(0)

    # The session cookie alone does not make an unsafe call: the page's CSRF token must come with it.
    token = page.get_attribute("meta[name=csrf-token]", "content")
    call = "([method, url, headers]) => fetch(url, {method, headers}).then(r => r.status)"
    assert page.evaluate(call, ["DELETE", "/adapters/missing", {}]) == 403
    assert page.evaluate(call, ["DELETE", "/adapters/missing", {"X-CSRF-Token": "forged"}]) == 403
    assert page.evaluate(call, ["DELETE", "/adapters/missing", {"X-CSRF-Token": token}]) == 404
    assert page.evaluate(call, ["GET", "/adapters", {}]) == 200
    # The pages' own scripts send it: generating and deleting work from a logged-in session.
    page.goto(f"/admin/playground?adapter={adapter.id}", wait_until="networkidle")
    page.fill("#prompt", "a gorgeous, witty film")
    page.click("#run")
    expect(page.locator("#out-adapter [data-role=meta]")).to_contain_text("finished:")
    expect(page.locator("#out-base [data-role=meta]")).to_contain_text("finished:")
    page.goto(f"/admin/adapters/{adapter.id}", wait_until="networkidle")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("button[data-delete-adapter]")
    page.wait_for_url("**/admin/adapters")
    expect(page.locator("#flash")).to_have_text("Deleted adapter “sst2-sentiment”.")

    page.click("text=Log out")
    page.wait_for_url("**/admin/login")
    page.goto("/admin")
    assert "/admin/login" in page.url
    assert httpx.get(f"{server.url}/admin/playground", headers={"Authorization": f"Bearer {inference_key}"}).status_code == 403
    # Expected: the refused logins (401, 403) and the refused fetches (403, 404) log failed loads.
    assert all(re.search(r"Failed to load resource: .* status of (401|403|404)", e) for e in console.errors), console.errors


def test_pause_resume_checkpoints_and_webhook_deliveries_on_the_job_page(make_live_server, tiny_base, browser):
    secret = "whsec_" + base64.b64encode(bytes(range(32))).decode()
    with Listener() as listener:
        server = make_live_server(tiny_base, webhook_url=listener.url, webhook_secret=secret)
        runtime = server.runtime
        job_id = new_id()
        with runtime.sessions() as session:
            jobs.create_job(session, job_id=job_id, name="pause-me", params={}, dataset_path=f"datasets/{job_id}",
                            train_examples=20, validation_examples=0)
        page, console = open_page(browser, server)
        page.goto(f"/admin/jobs/{job_id}", wait_until="networkidle")
        status, pause, resume = page.locator("h1 [data-field=status]"), page.locator("#pause-job"), page.locator("#resume-job")
        expect(status).to_have_text("queued")
        expect(page.locator("#checkpoints-empty")).to_be_visible()
        expect(page.locator("#deliveries-empty")).to_be_visible()
        expect(resume).to_be_hidden()

        pause.click()
        expect(status).to_have_text("paused")
        expect(page.locator("#flash")).to_have_text("Paused.")
        expect(pause).to_be_hidden()
        expect(resume).to_be_visible()
        expect(page.locator("#cancel-job")).to_be_visible()
        # The pause is announced: the node's delivery loop sends it, and the page follows it live.
        delivery = page.locator("#deliveries tbody tr")
        expect(delivery).to_have_count(1)
        expect(delivery).to_contain_text("fine_tuning.job.paused")
        expect(delivery).to_contain_text(f"http://127.0.0.1:{listener.port}")
        expect(delivery.locator(".badge")).to_have_text("delivered")
        expect(delivery.locator("td").nth(3)).to_have_text("1")
        expect(delivery).not_to_contain_text("token=abc")
        expect(page.locator("#deliveries-empty")).to_be_hidden()
        assert [r.headers["webhook-id"] for r in listener.received] == [delivery.get_attribute("data-delivery-id")]
        screenshot(page, "job_paused")

        resume.click()
        expect(status).to_have_text("queued")
        expect(page.locator("#flash")).to_have_text("Resumed: the job is queued again.")
        expect(resume).to_be_hidden()
        expect(pause).to_be_visible()
        assert httpx.get(f"{server.url}/train-jobs/{job_id}").json()["status"] == "queued"

        # A worker runs it and stores a checkpoint: it shows up live, with a way into the playground.
        with runtime.sessions() as session:
            assert jobs.claim(session, job_id, "test-worker")
        expect(status).to_have_text("running")
        checkpoint = add_checkpoint(runtime, job_id, 10, {"eval_loss": 0.4321, "eval_accuracy": 0.875, "train_loss": 0.61})
        row = page.locator(f"#checkpoints tbody tr[data-adapter-id='{checkpoint}']")
        expect(row).to_contain_text("0.4321")
        expect(row).to_contain_text("87.5%")
        expect(page.locator("#checkpoints-empty")).to_be_hidden()
        pause.click()  # running: it stops at its next step, so the page says it is pausing
        expect(status).to_have_text("running · pausing")
        expect(pause).to_be_hidden()
        expect(resume).to_be_hidden()
        screenshot(page, "job_checkpoints")

        row.get_by_role("link", name="Try in playground").click()
        page.wait_for_url(f"**/admin/playground?adapter={checkpoint}")
        expect(page.locator("#adapter")).to_have_value(checkpoint)
        expect(page.locator("#template-preview")).to_have_text(TEMPLATE)
        page.fill("#prompt", "a gorgeous, witty film")
        page.fill("#max_new_tokens", "4")
        page.click("#run")
        expect(page.locator("#out-adapter [data-role=meta]")).to_contain_text("finished:")
        expect(page.locator("#out-adapter h2")).to_contain_text(checkpoint)
        assert console.errors == []
