"use strict";
// The chat page. The conversation lives here and is sent whole with every message: the server keeps no state.

let messages = [];  // {role, text, images: [{name, data}]}, as the server reads them (a clip's data is a data:video/ URL)
let pending = [];   // images and clips added for the next message

function isMedia(file) {
  return file.type.startsWith("image/") || file.type.startsWith("video/");
}

function thumbnails(images, removable) {
  return images.map((image, k) => {
    const video = image.data.startsWith("data:video/");
    const preview = element(video ? "video" : "img", { src: image.data, title: image.name, ...(video ? { muted: true, loop: true, autoplay: true } : { alt: image.name }) });
    const figure = element("figure", {}, preview);
    if (removable) {
      const remove = element("button", { type: "button", textContent: "×", title: `remove ${image.name}` });
      remove.addEventListener("click", () => { pending.splice(k, 1); renderPending(); });
      figure.append(remove);
    }
    return figure;
  });
}

function bubble(message, meta) {
  const node = element("div", { class: `message ${message.role}` });
  if (message.images && message.images.length) node.append(element("div", { class: "thumbs" }, ...thumbnails(message.images, false)));
  node.append(element("span", { class: "text", textContent: message.text || (message.role === "assistant" ? "(empty answer)" : "") }));
  if (meta) node.append(element("span", { class: "meta", textContent: meta }));
  return node;
}

function renderConversation(waitingFor) {
  const nodes = messages.map((message) => bubble(message, message.meta));
  if (waitingFor) nodes.push(bubble(waitingFor), element("div", { class: "message assistant pending", textContent: "thinking…" }));
  $("empty").hidden = nodes.length > 0;
  $("conversation").replaceChildren($("empty"), ...nodes);
  $("conversation").lastElementChild.scrollIntoView({ block: "end" });
}

function renderPending() {
  $("pending").replaceChildren(...thumbnails(pending, true));
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve({ name: file.name, data: reader.result });
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

async function addFiles() {
  const files = [...$("files").files];
  $("files").value = "";  // choosing the same file again still fires a change
  const notMedia = files.filter((file) => !isMedia(file));
  if (notMedia.length) showError(`Not an image or a video, left out: ${notMedia.map((file) => file.name).join(", ")}`);
  try {
    pending.push(...await Promise.all(files.filter(isMedia).map(readFile)));
  } catch (err) {
    showError(err.message);
  }
  renderPending();
}

async function send(event) {
  event.preventDefault();
  const message = { role: "user", text: $("text").value.trim(), images: pending };
  if (!message.text && !message.images.length) return showError("Type a question or add an image first.");
  showError("");
  $("send").disabled = true;
  renderConversation(message);
  try {
    const reply = await api("/api/chat", { messages: [...messages, message],
      max_new_tokens: Number($("max-new-tokens").value), temperature: Number($("temperature").value) });
    messages.push(message, { role: "assistant", text: reply.answer, meta: `${reply.seconds} s` });
    pending = [];
    $("text").value = "";
    renderPending();
  } catch (err) {
    // The message stays in the composer, to fix and send again.
    showError(err.message);
  } finally {
    $("send").disabled = false;
    renderConversation();
  }
}

function newChat() {
  messages = [];
  pending = [];
  showError("");
  renderPending();
  renderConversation();
}

async function start() {
  $("composer").addEventListener("submit", send);
  $("files").addEventListener("change", addFiles);
  $("new-chat").addEventListener("click", newChat);
  $("text").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  try {
    const settings = await api("/api/settings");
    $("title").textContent = settings.title;
    Object.assign($("max-new-tokens"), { value: settings.max_new_tokens, max: settings.max_new_tokens_limit });
    Object.assign($("temperature"), { value: settings.temperature, max: settings.max_temperature });
  } catch (err) {
    showError(err.message);
  }
}

start();
