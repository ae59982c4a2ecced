// The playground's entry: asks the server what it serves, then shows the chat or the speech page.
// Every API call goes through `api`, which adds the API key the user gave and asks for one on a 401.
import { startChat } from "./chat.js";
import { startSpeech } from "./speech.js";

const KEY_STORAGE = "batchwise-api-key";
const RETRY_MS = 2000;
const keyForm = document.getElementById("key-form");
const keyInput = document.getElementById("api-key");
const errorBox = document.getElementById("error");

export class APIError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

export function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = !message;
}

function askForKey(message) {
  document.getElementById("key-message").textContent = message;
  keyForm.hidden = false;
  keyInput.focus();
}

export async function api(path, init = {}) {
  const key = localStorage.getItem(KEY_STORAGE);
  const headers = { ...(init.headers || {}), ...(key ? { Authorization: `Bearer ${key}` } : {}) };
  const response = await fetch(path, { ...init, headers });
  if (response.status === 401) {
    askForKey(key ? "That key was refused" : "This server needs an API key");
  }
  if (!response.ok) {
    throw new APIError(await errorMessage(response), response.status);
  }
  return response;
}

async function errorMessage(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function servedModel() {
  const models = await (await api("/v1/models")).json();
  return models.data[0].id;
}

async function start() {
  const server = await (await fetch("/", { headers: { Accept: "application/json" } })).json();
  let model;
  try {
    model = await servedModel();
  } catch (error) {
    if (error.status === 401) {
      await new Promise((resolve) => keyForm.addEventListener("submit", resolve, { once: true }));
    } else {
      showError(`${error.message} (retrying)`);  // e.g. 503 while the model loads
      await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
    }
    return start();
  }
  keyForm.hidden = true;
  showError("");
  document.getElementById("model").textContent = `${model} · ${server.serving_type}`;
  const page = server.serving_type === "whisper" ? startSpeech : startChat;
  page(model);
  document.body.dataset.ready = "true";
}

keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem(KEY_STORAGE, keyInput.value.trim());
});

start().catch((error) => showError(error.message));
