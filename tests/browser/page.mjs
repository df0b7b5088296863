// tests/serve.rs drives this: a headless Chromium loads the server's page, asks for two
// images of a prompt with DPM-Solver++ and a guidance interval, and waits until they show
// with those settings; the screenshot goes to the README.
//     node tests/browser/page.mjs http://127.0.0.1:PORT SCREENSHOT.png
import { chromium } from "playwright-core";

const [url, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 720 } });
  page.on("pageerror", (e) => console.error("page error:", e.message));
  await page.goto(url);
  await page.waitForFunction(() => document.getElementById("model").textContent !== "loading…");
  await page.fill("#prompt", "an owl with the moon behind it, pixel art");
  await page.fill("#num_images", "2");
  await page.fill("#seed", "7");
  await page.selectOption("#sampler", "dpmpp-2m");
  await page.fill("#interval_lo", "0.5");
  await page.fill("#interval_hi", "20");
  await page.click("#generate");
  await page.waitForFunction(
    () => [...document.querySelectorAll(".gallery img")].filter((i) => i.complete && i.naturalWidth > 0).length === 2,
    null,
    { timeout: 120000 },
  );
  const caption = await page.locator(".gallery .meta").first().textContent();
  for (const part of ["seed 7", "dpmpp-2m steps", "guided for σ in [0.5, 20]"]) {
    if (!caption.includes(part)) throw new Error(`unexpected caption: ${caption}`);
  }
  await page.screenshot({ path: screenshot });
  console.log("image shown:", caption);
} finally {
  await browser.close();
}
