// The page at GET / (placesnet/serve/page.py): the model card from /model, and each chosen or
// dropped photo answered by /predict, shown in the order chosen, with a toggle that swaps the
// photo for /explain's overlay (where the model looks). It is a client like any other: one
// request per photo (and one per overlay asked for), with the key as a Bearer header when the
// endpoint has one.
//
// Safe by construction: whatever comes from a response (class names, error messages, the note)
// is set with textContent, never parsed as HTML; the key lives in this module's memory only.

const PARALLEL = 4; // photos asked at once: the rest wait their turn
const NEEDS_KEY = document.body.dataset.needsKey === "yes";

// This tab's memory only: never in the URL, a cookie or local/session storage.
let apiKey = null;

// Extension point: each function is called as f(item, file, answer) once a photo's predictions
// are shown (item: its <li>, answer: /predict's JSON), e.g. a class-activation-map toggle that
// asks /explain and draws over item.querySelector("img").
const resultExtras = [];

// Indoor or outdoor under the bars, when the model says: /predict's "environment", which a model
// of Places365's 365 classes adds by the official rule (a model of other classes has none).
resultExtras.push((item, file, answer) => {
  if (typeof answer.environment !== "string") return;
  const line = element("p", "environment", "Environment: ");
  line.append(element("strong", "", answer.environment));
  item.querySelector(".body").append(line);
});

// "Where the model looks": a toggle under the bars that swaps the photo for /explain's overlay
// (the photo as the model saw it, red where the evidence for its top-1 class is) and back. The
// overlay is asked for once, on the first press, and kept as a blob: URL for this tab.
resultExtras.push((item, file) => {
  const button = element("button", "explain", "Where the model looks");
  button.type = "button";
  button.setAttribute("aria-pressed", "false");
  const caption = element("p", "explained");
  caption.hidden = true;
  let overlay = null; // {url, text} once /explain has answered
  let photo = null; // the preview's own source while the overlay is shown ("" if it had none)

  function show(pressed) {
    let preview = item.querySelector("img.preview");
    if (pressed) {
      if (!preview) {
        // the browser could not show this file, the model could read it: the overlay alone
        preview = element("img", "preview");
        preview.alt = "";
        item.prepend(preview);
      }
      photo = preview.getAttribute("src") || "";
      preview.src = overlay.url;
      caption.textContent = overlay.text;
    } else if (preview) {
      if (photo) preview.src = photo;
      else preview.remove();
    }
    caption.classList.remove("error");
    caption.hidden = !pressed;
    button.setAttribute("aria-pressed", String(pressed));
    button.textContent = pressed ? "Show the photo" : "Where the model looks";
  }

  button.addEventListener("click", async () => {
    if (button.getAttribute("aria-pressed") === "true") return show(false);
    if (overlay === null) {
      button.disabled = true;
      caption.classList.remove("error");
      caption.textContent = "Asking the model where it looks…";
      caption.hidden = false;
      try {
        const response = await send("explain", upload(file));
        const explained = JSON.parse(response.headers.get("X-Explained-Class"));
        const percent = (explained.probability * 100).toFixed(1);
        overlay = {
          url: URL.createObjectURL(await response.blob()),
          text: `Red: where the model sees ${explained.label} (${percent}%).`,
        };
      } catch (error) {
        caption.classList.add("error");
        caption.textContent = describe(error);
        if (error.status === 401) refusedKey(error);
        return;
      } finally {
        button.disabled = false;
      }
    }
    show(true);
  });
  item.querySelector(".body").append(button, caption);
});

const $ = (selector) => document.querySelector(selector);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

class Refused extends Error {
  // An answer that is not 2xx: its status and the endpoint's {"error": ...} message.
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function send(path, init = {}) {
  // The 2xx response to a request to this endpoint (a relative path), or Refused.
  const headers = new Headers(init.headers);
  if (apiKey !== null) headers.set("Authorization", `Bearer ${apiKey}`);
  const response = await fetch(path, { ...init, headers, cache: "no-store", credentials: "omit" });
  if (response.ok) return response;
  const text = await response.text();
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON: e.g. Serve's proxy answers a crashed replica's requests in plain text
  }
  const message = body && typeof body.error === "string" ? body.error : text.slice(0, 300);
  throw new Refused(response.status, message || response.statusText);
}

async function call(path, init = {}) {
  // The JSON answer of a request to this endpoint, or Refused.
  return (await send(path, init)).json();
}

function describe(error) {
  // One line for a failed request, the endpoint's own message in it.
  return error instanceof Refused ? `Refused (${error.status}): ${error.message}` : `Failed: ${error.message}`;
}

function upload(file) {
  // A photo as /predict and /explain take it: one multipart field "file".
  const form = new FormData();
  form.append("file", file, file.name);
  return { method: "POST", body: form };
}

// --- the key ----------------------------------------------------------------------------------

function askForKey(message) {
  $("#key").hidden = false;
  $("#upload").hidden = true;
  $("#key-message").textContent = message;
  $("#key-input").value = "";
  $("#key-input").focus();
}

$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault(); // never submitted: the key goes nowhere but into a header
  apiKey = $("#key-input").value.trim();
  $("#key-input").value = "";
  start();
});

function refusedKey(error) {
  // A 401: the key was missing or wrong. Forget it and ask again, saying which.
  const had = apiKey !== null;
  apiKey = null;
  askForKey(
    had ? `Wrong key: the endpoint refused it (${error.message}).` : "This endpoint needs its API key.",
  );
}

// --- the model card ---------------------------------------------------------------------------

function trainedOn(config) {
  if (config.dataset === "sample") {
    return `the embedded sample data (drawn scenes, ${config.sample_difficulty})`;
  }
  if (config.dataset === "places365") return "Places365 (photos)";
  return String(config.dataset);
}

function showCard(info) {
  $("#card-data").textContent = trainedOn(info.config || {});
  $("#card-top1").textContent =
    typeof info.val_top1 === "number" ? `${(info.val_top1 * 100).toFixed(1)}%` : "not recorded";
  $("#card-classes").textContent = String(info.num_classes);
  $("#card-model").textContent = `${info.model} (epoch ${info.epoch})`;
  $("#card-note").textContent = info.note ? `Note: ${info.note}.` : "";
  $("#card-note").hidden = !info.note;
  $("#card").hidden = false;
}

async function start() {
  $("#card-error").hidden = true;
  try {
    showCard(await call("model"));
  } catch (error) {
    if (error.status === 401) return refusedKey(error);
    $("#card-error").textContent = `The endpoint did not answer /model: ${error.message}`;
    $("#card-error").hidden = false;
    return;
  }
  $("#key").hidden = true;
  $("#upload").hidden = false;
}

// --- photos -----------------------------------------------------------------------------------

function newItem(file) {
  // The photo's place in the list, in the order chosen, until its answer comes.
  const item = element("li", "result pending");
  const preview = element("img", "preview");
  preview.alt = "";
  preview.src = URL.createObjectURL(file);
  preview.addEventListener("error", () => preview.remove()); // not an image the browser can show
  const body = element("div", "body");
  body.append(element("h3", "file", file.name), element("p", "status", "Asking the model…"));
  item.append(preview, body);
  $("#results").append(item);
  return item;
}

function showPredictions(item, predictions) {
  const list = element("ol", "predictions");
  for (const prediction of predictions) {
    const row = element("li", "prediction");
    row.dataset.probability = String(prediction.probability);
    const label = element("span", "label");
    label.textContent = prediction.label;
    const bar = element("span", "bar");
    const fill = element("span", "fill");
    fill.style.width = `${(prediction.probability * 100).toFixed(1)}%`; // CSSOM: allowed by the CSP
    bar.append(fill);
    row.append(label, bar, element("span", "percent", `${(prediction.probability * 100).toFixed(1)}%`));
    list.append(row);
  }
  item.querySelector(".status").replaceWith(list);
}

function showError(item, error) {
  item.classList.add("refused");
  const status = item.querySelector(".status");
  status.classList.add("error");
  status.textContent = describe(error);
}

async function answer(item, file) {
  try {
    const body = await call("predict", upload(file));
    showPredictions(item, body.predictions);
    for (const extra of resultExtras) extra(item, file, body);
  } catch (error) {
    showError(item, error);
    if (error.status === 401) refusedKey(error);
  } finally {
    item.classList.remove("pending");
  }
}

async function addPhotos(fileList) {
  const photos = [...fileList];
  const items = photos.map(newItem);
  let next = 0;
  const worker = async () => {
    while (next < photos.length) {
      const i = next++;
      await answer(items[i], photos[i]);
    }
  };
  await Promise.all(Array.from({ length: Math.min(PARALLEL, photos.length) }, worker));
}

$("#files").addEventListener("change", (event) => {
  addPhotos(event.target.files);
  event.target.value = ""; // the same photos can be chosen again
});

// Dropped anywhere on the page, once it is unlocked; elsewhere the browser would open the file.
document.addEventListener("dragover", (event) => {
  event.preventDefault();
  $("#drop").classList.toggle("over", !$("#upload").hidden);
});
document.addEventListener("dragleave", () => $("#drop").classList.remove("over"));
document.addEventListener("drop", (event) => {
  event.preventDefault();
  $("#drop").classList.remove("over");
  if (!$("#upload").hidden) addPhotos(event.dataTransfer.files);
});

if (NEEDS_KEY) askForKey("");
else start();
