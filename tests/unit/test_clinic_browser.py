"""The clinic page in a real headless browser (Debian's chromium driven by Selenium): a diagnosis
server and `medhe clinic`'s app run on 127.0.0.1 (clear backend: this tier tests the page, not the
encryption); the page makes keys, takes a real DICOM and a PNG through its file picker, and shows
the diagnoses the CLI prints for the same files; a corrupt file gets a message naming it.

Set MEDHE_CLINIC_SCREENSHOT=PATH to also write the result page's screenshot there, and
MEDHE_CLINIC_BACKEND=seal to run it on real 128-bit CKKS (docs/clinic.png in the README comes from
this test run so)."""

from __future__ import annotations

import io
import os
import re
import shutil
import threading
import time
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medhe.cli.main import main
from medhe.compiler import compile_model
from medhe.data.br35h import br35h_root
from medhe.nn.modeldir import resolve_model_dir
from medhe.protocol.remote import RemoteClient
from medhe.service.app import create_app
from medhe.service.auth import TokenStore
from medhe.service.clinic import ClinicApp, create_clinic_app
from medhe.service.hosting import host_plan
from tests.service_process import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
selenium = pytest.importorskip("selenium", reason="selenium is in the dev extra (pip install -e '.[dev]')")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="no chromium + chromedriver (apt-get install chromium chromium-driver; "
                                       ".ci/run installs them)")


@contextmanager
def serving(app):
    """`app` on a free port of 127.0.0.1 in a thread -> its URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1700",
                     "--disable-gpu", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _wait_for(predicate, what: str, timeout_s: float = 60):
    """predicate()'s first true value; the page re-renders while it polls, so a stale element
    is read again."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            value = predicate()
        except StaleElementReferenceException:
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _cli_diagnosis(server_url: str, token: str, keys: Path, image: Path, backend: str) -> tuple[str, str]:
    """(label, probability) as `medhe diagnose --server` prints them."""
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["diagnose", "--server", server_url, "--token", token, "--model", "br35h", "--keys", str(keys),
                     "--backend", backend, str(image)]) == 0
    line = [row for row in out.getvalue().splitlines() if row.startswith(str(image)[-39:])][-1]
    match = re.match(r".{40}(.+?)\s+(\d\.\d{3})\s", line)
    return match.group(1).strip(), match.group(2)


def test_the_clinic_page_diagnoses_dicom_and_png_like_the_cli(tmp_path, browser):
    from selenium.webdriver.common.by import By

    backend = os.environ.get("MEDHE_CLINIC_BACKEND", "clear")
    data = tmp_path / "srv"
    tokens = TokenStore(data)
    token = tokens.add("clinic-a", "clinic")
    server_app = create_app([host_plan(data, "br35h", compile_model(resolve_model_dir("br35h")), backend=backend)],
                            data_dir=data, tokens=tokens)
    dicom = tmp_path / "MR_small.dcm"
    dicom.write_bytes(Path(get_testdata_file("MR_small.dcm")).read_bytes())
    png = tmp_path / "brain_mri.png"
    Image.open(br35h_root() / "yes" / "y0.jpg").convert("L").save(png)
    corrupt = tmp_path / "corrupt.dcm"
    corrupt.write_bytes(dicom.read_bytes()[:900])

    with serving(server_app) as server_url:
        remote = RemoteClient(server_url, token=token, backend=backend, key_home=tmp_path / "clinic-keys")
        clinic = ClinicApp(remote)
        with serving(create_clinic_app(clinic)) as page_url:
            browser.get(f"{page_url}/?token={clinic.access_token}")
            _wait_for(lambda: "connected" in browser.find_element(By.ID, "server-status").text, "the server status")
            options = browser.find_elements(By.CSS_SELECTOR, "#model option")
            assert [o.get_attribute("value") for o in options] == ["br35h"]
            assert "No keys yet" in browser.find_element(By.ID, "keys-state").text

            browser.find_element(By.ID, "prepare-keys").click()
            _wait_for(lambda: "Keys ready" in browser.find_element(By.ID, "keys-state").text, "keys", 300)
            assert re.search(r"evaluation keys \d+ (bytes|KiB|MiB)", browser.find_element(By.ID, "keys-state").text)

            browser.find_element(By.ID, "files").send_keys(f"{dicom}\n{png}")

            def rows():
                return {r.find_elements(By.TAG_NAME, "td")[0].text: r
                        for r in browser.find_elements(By.CSS_SELECTOR, "#studies tbody tr")}

            def all_done():
                cells = {name: row.find_elements(By.TAG_NAME, "td")[1].text for name, row in rows().items()}
                return len(cells) == 2 and all(state == "done" for state in cells.values())

            _wait_for(all_done, "both studies", 300)
            for image in (dicom, png):
                rows()[image.name].click()
                _wait_for(lambda: browser.find_element(By.ID, "study-name").text == image.name, "the study card")
                label = browser.find_element(By.ID, "result-label").text
                probability = browser.find_element(By.ID, "result-probability").text.split()[-1]
                cli_label, cli_probability = _cli_diagnosis(server_url, token, tmp_path / "cli-keys", image, backend)
                assert label == cli_label
                # Equal on the clear backend; fresh CKKS noise on SEAL moves the third decimal at most.
                assert abs(float(probability) - float(cli_probability)) <= (0 if backend == "clear" else 2e-3)
                steps = browser.find_element(By.ID, "steps").text
                assert len(re.findall(r"\d+\.\d+ s", steps)) == 5, steps
                assert "never left this computer" in browser.find_element(By.ID, "privacy").text
                # pydicom's MR_small is a 64x64 crop unlike Br35H's slices: the page warns; the Br35H scan passes.
                warnings = [w.text for w in browser.find_elements(By.ID, "input-warning")]
                assert bool(warnings) == (image is dicom) and all("unlike the images" in w for w in warnings)
                assert browser.find_element(By.ID, "preview").get_attribute("src").startswith("data:image/png")
            rows()[dicom.name].click()
            metadata = browser.find_element(By.ID, "metadata").text
            assert "MR" in metadata and "64 x 64 px" in metadata and "\u2022" in metadata

            # A row is chosen with the keyboard too.
            from selenium.webdriver.common.keys import Keys

            rows()[dicom.name].send_keys(Keys.ENTER)
            _wait_for(lambda: browser.find_element(By.ID, "study-name").text == dicom.name, "keyboard selection")
            assert "token" not in browser.current_url  # taken out of the address bar and history

            screenshot = os.environ.get("MEDHE_CLINIC_SCREENSHOT")
            rows()[png.name].click()
            _wait_for(lambda: browser.find_element(By.ID, "study-name").text == png.name, "the study card")
            if screenshot:
                browser.save_screenshot(screenshot)

            browser.find_element(By.ID, "files").send_keys(str(corrupt))
            errors = _wait_for(lambda: browser.find_element(By.ID, "errors").text, "the error message")
            assert "corrupt.dcm" in errors and "DICOM" in errors
            assert rows()["corrupt.dcm"].find_elements(By.TAG_NAME, "td")[1].text == "failed"
            # A folder of studies (its other files left out) becomes a row per image.
            folder = tmp_path / "studies"
            folder.mkdir()
            for index in range(2):
                Image.open(png).rotate(90 * (index + 1)).save(folder / f"study{index}.png")
            (folder / "notes.txt").write_text("not an image")
            browser.find_element(By.ID, "folder").send_keys(str(folder))
            names = _wait_for(lambda: (lambda shown: shown if {"studies/study0.png", "studies/study1.png"} <= shown
                                       else None)(set(rows())), "the folder's rows", 300)
            assert not any("notes" in name for name in names)
            _wait_for(lambda: all(rows()[f"studies/study{i}.png"].find_elements(By.TAG_NAME, "td")[1].text == "done"
                                  for i in range(2)), "the folder's diagnoses", 300)

            # Sorting by file name: ascending, then descending on a second click (the rows came in
            # another order), with aria-sort telling which.
            def shown_names():
                return [r.find_elements(By.TAG_NAME, "td")[0].text
                        for r in browser.find_elements(By.CSS_SELECTOR, "#studies tbody tr")]

            arrival = _wait_for(shown_names, "the rows' names")  # re-read if the table re-renders meanwhile
            header = browser.find_element(By.CSS_SELECTOR, "th button[data-key='name']")
            header.click()
            ascending = sorted(arrival)
            assert _wait_for(lambda: shown_names() == ascending, "ascending order")
            assert header.find_element(By.XPATH, "..").get_attribute("aria-sort") == "ascending"
            header.click()
            assert _wait_for(lambda: shown_names() == ascending[::-1], "descending order")
            assert header.find_element(By.XPATH, "..").get_attribute("aria-sort") == "descending"
            assert ascending[::-1] != arrival
            browser.save_screenshot(str(tmp_path / "clinic.png"))
        clinic.close()
        remote.close()
