"use strict";
// Shared by both pages: element lookup, JSON calls whose errors carry the server's message, the error banner.

const $ = (id) => document.getElementById(id);

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  node.append(...children);
  return node;
}

// The server's per-launch token, put into the page by the server: every POST must carry it.
const TOKEN = document.querySelector('meta[name="owl-token"]').content;

async function api(path, body) {
  const options = body === undefined ? {} :
    { method: "POST", headers: { "Content-Type": "application/json", "X-Owl-Token": TOKEN }, body: JSON.stringify(body) };
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new Error(`Cannot reach the server (${err.message}): is it still running?`);
  }
  let data;
  try {
    data = await response.json();
  } catch (err) {
    throw new Error(`${path}: the server answered HTTP ${response.status} without JSON`);
  }
  if (!response.ok) throw new Error(data.error || `${path}: HTTP ${response.status}`);
  return data;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}
