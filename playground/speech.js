// The speech page (--serving-type whisper): an uploaded file or a microphone recording is sent to
// /v1/audio/transcriptions (or /translations) and its transcript and timed segments are shown.
import { api, showError } from "./playground.js";

const field = (id) => document.getElementById(id);

function showTranscript(result) {
  field("transcript").textContent = result.text;
  const rows = (result.segments || []).map((segment) => {
    const row = document.createElement("tr");
    for (const value of [segment.start.toFixed(2), segment.end.toFixed(2), segment.text]) {
      row.append(Object.assign(document.createElement("td"), { textContent: value }));
    }
    return row;
  });
  field("segments").querySelector("tbody").replaceChildren(...rows);
  field("segments").hidden = rows.length === 0;
}

async function transcribe(model, audio, filename) {
  showError("");
  const status = field("speech-status");
  status.textContent = `Transcribing ${filename}…`;
  delete status.dataset.done;
  const form = new FormData();
  form.append("file", audio, filename);
  form.append("model", model);
  form.append("response_format", "verbose_json");
  form.append("timestamp_granularities[]", "segment");
  const language = field("language").value.trim();
  if (language && field("task").value === "transcriptions") form.append("language", language);
  try {
    const response = await api(`/v1/audio/${field("task").value}`, { method: "POST", body: form });
    const result = await response.json();
    showTranscript(result);
    status.textContent = `${filename}: ${result.duration.toFixed(1)} s of audio`;
    status.dataset.done = "true";
  } catch (error) {
    status.textContent = "";
    showError(error.message);
  }
}

class Recorder {
  constructor(onAudio) {
    this.onAudio = onAudio;
    this.recorder = null;
  }

  get recording() {
    return this.recorder?.state === "recording";
  }

  async start() {
    const microphone = await navigator.mediaDevices.getUserMedia({ audio: true });
    const chunks = [];
    this.recorder = new MediaRecorder(microphone);
    this.recorder.addEventListener("dataavailable", (event) => chunks.push(event.data));
    this.recorder.addEventListener("stop", () => {
      microphone.getTracks().forEach((track) => track.stop());
      this.onAudio(new Blob(chunks, { type: this.recorder.mimeType }));
    });
    this.recorder.start();
  }

  stop() {
    this.recorder.stop();
  }
}

export function startSpeech(model) {
  field("speech").hidden = false;
  const button = field("record");
  const recorder = new Recorder((audio) => transcribe(model, audio, "recording.webm"));
  field("audio-file").addEventListener("change", (event) => {
    const [file] = event.target.files;
    if (file) transcribe(model, file, file.name);
  });
  button.addEventListener("click", async () => {
    try {
      if (recorder.recording) {
        recorder.stop();
      } else {
        await recorder.start();
      }
    } catch (error) {
      showError(`Microphone: ${error.message}`);
    }
    button.textContent = recorder.recording ? "Stop recording" : "Record from microphone";
    button.classList.toggle("recording", recorder.recording);
  });
}
