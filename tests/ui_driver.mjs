// Drives the /ui page in headless Chromium for tests/test_ui.py (which makes the assertions).
// Usage: node tests/ui_driver.mjs '<json plan>'   (plan: see tests/test_ui.py)
// Prints one JSON object: what the page showed.
import { readFileSync } from "node:fs";
import { basename } from "node:path";
import { chromium } from "playwright-core";

const plan = JSON.parse(process.argv[2]);
const TIMEOUT = 120_000; // a shared 2-core machine: generous waits, no timing assertions

const browser = await chromium.launch({
  executablePath: plan.chromium,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const observed = { cards: [], console_errors: [] };
try {
  const page = await browser.newPage({ viewport: { width: 1000, height: 900 } });
  page.setDefaultTimeout(TIMEOUT);
  page.on("pageerror", (error) => observed.console_errors.push(String(error)));
  const response = await page.goto(plan.url + "/ui");
  observed.status = response.status();
  observed.final_url = page.url();
  await page.waitForSelector("body[data-ready=true]");
  observed.models = await page.$$eval("#model option", (options) => options.map((o) => o.value));

  let expected = 0;
  for (const step of plan.steps) {
    await page.selectOption("#model", step.model);
    observed.cards.push(await page.textContent("#card"));
    if (step.drop) { // drag-and-drop: a drop event carrying the file, as a browser makes it
      const data = readFileSync(step.files[0]).toString("base64");
      const transfer = await page.evaluateHandle(([b64, name, type]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, { type }));
        return dt;
      }, [data, basename(step.files[0]), step.type || "image/jpeg"]);
      await page.dispatchEvent("#drop", "drop", { dataTransfer: transfer });
    } else {
      await page.setInputFiles("#files", step.files); // the file picker, several files at once
    }
    expected += step.files.length;
    await page.waitForFunction((n) => document.querySelectorAll(".result.done").length === n, expected);
  }
  observed.results = await page.$$eval(".result", (nodes) => nodes.map((node) => ({
    name: node.querySelector(".name").textContent,
    model: node.dataset.model,
    meta: node.querySelector(".meta").textContent,
    label: node.querySelector(".label").textContent,
    failed: node.classList.contains("failed"),
    error: node.querySelector(".error").hidden ? null : node.querySelector(".error").textContent,
    error_code: node.querySelector(".error-code").hidden ? null : node.querySelector(".error-code").textContent,
    ood: node.querySelector(".ood").hidden ? null : node.querySelector(".ood").textContent,
    bars: Array.from(node.querySelectorAll(".bar")).map((bar) => ({
      label: bar.querySelector(".bar-label").textContent,
      value: bar.querySelector(".bar-value").textContent,
      // the drawn width, as a share of the track
      share: bar.querySelector(".bar-fill").getBoundingClientRect().width
             / bar.querySelector(".bar-track").getBoundingClientRect().width,
    })),
    preview_loaded: (() => { const img = node.querySelector(".preview img"); return !!img && img.naturalWidth > 0; })(),
    gradcam_shown: !node.querySelector(".gradcam").hidden,
    gradcam_width: (() => { const img = node.querySelector(".gradcam img"); return img ? img.naturalWidth : 0; })(),
  })));
  await page.screenshot({ path: plan.screenshot, fullPage: true });
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(observed));
