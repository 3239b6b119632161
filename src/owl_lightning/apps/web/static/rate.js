"use strict";
// The rating page: one question at a time (#q=ID in the address), A/B/C/D per anonymous answer, a summary view.

let overview = null;  // {scale, systems, summary_shown, questions: [{question_id, category, rated, answers}]}
let current = null;   // the question id on screen

function entry(questionId) {
  return overview.questions.find((q) => q.question_id === questionId);
}

function renderChips() {
  const chips = overview.questions.map((q) => {
    const state = q.rated === 0 ? "" : q.rated === q.answers ? "done" : "partial";
    const chip = element("button", { class: `${state} ${q.question_id === current ? "current" : ""}`, textContent: q.question_id,
      title: `question ${q.question_id}: ${q.rated} of ${q.answers} rated`, "data-question": q.question_id });
    chip.addEventListener("click", () => showQuestion(q.question_id));
    return chip;
  });
  $("chips").replaceChildren(...chips);
  const rated = overview.questions.reduce((sum, q) => sum + q.rated, 0);
  const total = overview.questions.reduce((sum, q) => sum + q.answers, 0);
  $("progress").textContent = `${rated} of ${total} answers rated · ${overview.systems} systems · ${overview.questions.length} questions`;
}

function answerCard(question, answer) {
  const buttons = Object.entries(overview.scale).map(([letter, meaning]) => {
    const button = element("button", { textContent: letter, title: `${letter}: ${meaning}`, "data-rating": letter,
      class: answer.rating === letter ? "selected" : "" });
    button.addEventListener("click", () => rate(question.question_id, answer.slot, letter, card));
    return button;
  });
  const card = element("article", { class: "answer", "data-slot": answer.slot },
    element("h3", {}, `Answer ${answer.slot}`, element("span", { class: "saved" })));
  if (answer.earlier_answers.length) {
    const turns = answer.earlier_answers.map((text, k) =>
      element("li", {}, element("b", {}, question.earlier_questions[k]), "\n", text));
    card.append(element("details", {}, element("summary", {}, "its earlier answers in this conversation"), element("ol", {}, ...turns)));
  }
  card.append(element("div", { class: "text", textContent: answer.answer || "(empty answer)" }), element("div", { class: "rating" }, ...buttons));
  return card;
}

async function showQuestion(questionId) {
  let question;
  try {
    question = await api(`/api/question?id=${questionId}`);
  } catch (err) {
    return showError(err.message);
  }
  showError("");
  current = question.question_id;
  history.replaceState(null, "", `#q=${current}`);
  const image = $("image");
  image.hidden = Boolean(question.image_error);
  $("image-error").hidden = !question.image_error;
  $("image-error").textContent = question.image_error || "";
  image.onerror = () => {
    image.hidden = true;
    $("image-error").hidden = false;
    $("image-error").textContent = `The image ${question.image} could not be loaded.`;
  };
  if (!question.image_error) image.src = question.image;
  const categories = question.category.map((c) => c.replace("_", "-")).join(" and ");
  $("meta").textContent = `Question ${current} · ${categories}${question.ability ? ` · abilities ${question.ability}` : ""}`;
  $("earlier-label").hidden = question.earlier_questions.length === 0;
  $("earlier").replaceChildren(...question.earlier_questions.map((text) => element("li", { textContent: text })));
  $("question-text").textContent = question.question;
  $("answers").replaceChildren(...question.answers.map((answer) => answerCard(question, answer)));
  renderChips();
}

async function rate(questionId, slot, letter, card) {
  let saved;
  try {
    saved = await api("/api/rate", { question_id: questionId, slot, rating: letter });
  } catch (err) {
    return showError(`Not saved: ${err.message}`);
  }
  showError("");
  // Shown as chosen only once the server has it on disk.
  for (const button of card.querySelectorAll(".rating button")) button.classList.toggle("selected", button.dataset.rating === saved.rating);
  card.querySelector(".saved").textContent = `saved ${saved.rating}`;
  Object.assign(entry(questionId), { rated: saved.rated, answers: saved.answers });
  renderChips();
}

function step(offset) {
  const at = overview.questions.findIndex((q) => q.question_id === current);
  const count = overview.questions.length;
  showQuestion(overview.questions[(at + offset + count) % count].question_id);
}

function nextUnrated() {
  const at = overview.questions.findIndex((q) => q.question_id === current);
  const count = overview.questions.length;
  for (let k = 1; k <= count; k++) {
    const candidate = overview.questions[(at + k) % count];
    if (candidate.rated < candidate.answers) return showQuestion(candidate.question_id);
  }
  showError("Every answer is rated: see the summary.");
}

async function showSummary() {
  // Blind mode: nothing per system is asked for until the rater says they have finished.
  $("blind-notice").hidden = overview.summary_shown;
  $("summary").hidden = !overview.summary_shown;
  if (!overview.summary_shown) return;
  let summary;
  try {
    summary = await api("/api/summary");
  } catch (err) {
    return showError(err.message);
  }
  renderSummary(summary);
}

async function revealSummary() {
  let summary;
  try {
    summary = await api("/api/reveal", {});
  } catch (err) {
    return showError(err.message);
  }
  overview.summary_shown = true;
  $("blind-notice").hidden = true;
  $("summary").hidden = false;
  renderSummary(summary);
}

function renderSummary(summary) {
  const letters = [...Object.keys(overview.scale), "unrated"];
  const categories = Object.keys(summary.denominators);
  const groups = categories.map((c) => element("th", { colSpan: letters.length, textContent: `${c.replace("_", "-")} (${summary.denominators[c]})` }));
  const head = [element("tr", {}, element("th", { rowSpan: 2, textContent: "system" }), ...groups),
    element("tr", {}, ...categories.flatMap(() => letters.map((l) => element("th", { textContent: l }))))];
  const rows = summary.rows.map((row) => element("tr", { "data-model": row.model_id }, element("td", { textContent: row.model_id }),
    ...categories.flatMap((c) => letters.map((l) => element("td", { textContent: row[c][l], "data-category": c, "data-letter": l })))));
  $("summary-table").replaceChildren(element("thead", {}, ...head), element("tbody", {}, ...rows));
  $("summary-markdown").textContent = summary.markdown;
}

function showView(name) {
  $("rate-view").hidden = name !== "rate";
  $("summary-view").hidden = name !== "summary";
  if (name === "summary") {
    history.replaceState(null, "", "#summary");
    return showSummary();
  }
  return showQuestion(current);
}

async function start() {
  try {
    overview = await api("/api/overview");
  } catch (err) {
    return showError(err.message);
  }
  $("scale").replaceChildren(...Object.entries(overview.scale).flatMap(([letter, meaning]) =>
    [element("dt", { textContent: letter }), element("dd", { textContent: meaning })]));
  $("previous").addEventListener("click", () => step(-1));
  $("next").addEventListener("click", () => step(1));
  $("next-unrated").addEventListener("click", nextUnrated);
  $("rate-tab").addEventListener("click", () => showView("rate"));
  $("summary-tab").addEventListener("click", () => showView("summary"));
  $("reveal").addEventListener("click", revealSummary);
  const wanted = Number((location.hash.match(/q=(\d+)/) || [])[1]);
  current = entry(wanted) ? wanted : overview.questions[0].question_id;
  await showView(location.hash === "#summary" ? "summary" : "rate");
}

start();
