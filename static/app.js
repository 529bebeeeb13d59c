// twostep: the little JavaScript the pages need (kept in a file so the CSP can forbid inline scripts).

// The 2FA wizard dialog (templates/settings/_wizard_dialog.html). htmx loads it into #dialog-slot; here we
// only open it as a modal, move focus into each new step, close it on Cancel/Done/Escape, and give focus
// back to the gear. Without JavaScript the same steps are plain pages and these handlers never run.
(function () {
  "use strict";
  var opener = null;

  document.addEventListener("htmx:beforeRequest", function (event) {
    var elt = event.detail.elt;
    if (elt && elt.matches && elt.matches("[data-opens-dialog]")) opener = elt;
  });

  // htmx:load fires for every element htmx inserts: a new dialog, or a step that replaced the previous one.
  document.addEventListener("htmx:load", function (event) {
    var elt = event.detail.elt;
    if (!elt || !elt.matches) return;
    var dialog = elt.matches("dialog.wizard") ? elt : elt.closest("dialog.wizard");
    if (!dialog) return;
    if (!dialog.open) dialog.showModal();
    var target = dialog.querySelector(".wizard-step [autofocus]") || dialog.querySelector(".wizard-step .step-title");
    if (target) target.focus();
  });

  // The Two-Factor Authentication row, the sessions list, a person's row on the Support page and the contact
  // requests card replace themselves after a change, taking the button just pressed with them: focus the first
  // field with an error, else the field the answer asks for, else the message saying what happened, so
  // keyboard and screen-reader users are not left on <body>. Not while the wizard is open (its last step
  // refreshes the row out of band, behind the dialog), and not for a list refreshed out of band alongside.
  document.addEventListener("htmx:load", function (event) {
    var elt = event.detail.elt;
    if (!elt || !elt.matches || !elt.matches("#tfa-row, #sessions, .user-row, #open-requests")) return;
    if (document.querySelector("dialog.wizard[open]")) return;
    var target = elt.querySelector('[aria-invalid="true"]') || elt.querySelector("[autofocus]") ||
      elt.querySelector(".form-error, .notice, [role=status][tabindex]");
    if (target) target.focus();
  });

  // The Support page's results replace themselves a moment after typing in Search users: someone who had
  // tabbed on into the old results (before the answer came) was left on <body>, and the next Tab started at
  // the top of the page. Back to the search field then; the status line says what the new search found.
  document.addEventListener("htmx:load", function (event) {
    var elt = event.detail.elt;
    if (!elt || elt.id !== "results" || (document.activeElement && document.activeElement !== document.body)) return;
    var search = document.getElementById("q");
    if (search) search.focus();
  });

  // A request that gets no answer from the app did nothing visible at all: the network was down, or a proxy
  // in front of the app answered 502/504 itself. (The app's own error answers ask htmx for a reload, which
  // shows them: webapp render_error; htmx swaps no 4xx or 5xx.) Say so where the person is looking, in the
  // open dialog or in the page's messages, and take the note away once a request goes through again.
  function noAnswer(text) {
    var box = document.querySelector("dialog.wizard[open] .wizard-step") || document.getElementById("flashes");
    if (!box) return;
    var note = box.querySelector(".no-answer") || document.createElement("p");
    note.className = "flash error no-answer";
    note.setAttribute("role", "alert");
    note.textContent = text;
    if (!note.parentNode) box.insertBefore(note, box.firstChild);
  }
  document.addEventListener("htmx:sendError", function () {
    noAnswer("The server could not be reached, so nothing was changed. Check your connection, then try again.");
  });
  document.addEventListener("htmx:timeout", function () {
    noAnswer("The server took too long to answer. Try again in a moment.");
  });
  document.addEventListener("htmx:responseError", function (event) {
    var status = event.detail.xhr ? event.detail.xhr.status : 0;
    if (status >= 500) noAnswer("The server could not answer just now (error " + status + "). Try again in a moment.");
  });
  document.addEventListener("htmx:afterRequest", function (event) {
    if (!event.detail.successful) return;
    var notes = document.querySelectorAll(".no-answer");
    for (var i = 0; i < notes.length; i++) notes[i].remove();
  });

  // Times are written in UTC (and stay so without JavaScript); a <time data-local> is shown in the
  // browser's own time zone instead, with the UTC original as its tooltip.
  // data-local="date" shows the date alone. Formats are made on first use: if the browser refused them,
  // the times would stay in UTC and nothing else on the page would break.
  var formats = null;
  function showLocalTimes(root) {
    var times = root.querySelectorAll ? root.querySelectorAll("time[data-local]") : [];
    if (!times.length) return;
    try {
      formats = formats || {
        time: new Intl.DateTimeFormat(undefined, {year: "numeric", month: "short", day: "numeric",
          hour: "2-digit", minute: "2-digit", timeZoneName: "short"}),
        date: new Intl.DateTimeFormat(undefined, {year: "numeric", month: "short", day: "numeric"})
      };
    } catch (error) {
      return;
    }
    for (var i = 0; i < times.length; i++) {
      var when = new Date(times[i].getAttribute("datetime"));
      if (isNaN(when.getTime())) continue;
      var format = times[i].getAttribute("data-local") === "date" ? formats.date : formats.time;
      times[i].title = times[i].textContent + (format === formats.date ? " (UTC)" : "");
      times[i].textContent = format.format(when);
      times[i].removeAttribute("data-local");
    }
  }
  document.addEventListener("DOMContentLoaded", function () { showLocalTimes(document); });
  document.addEventListener("htmx:load", function (event) { if (event.detail.elt) showLocalTimes(event.detail.elt); });

  // A plain form (one htmx does not send) goes once: a second click while the first answer is on its way
  // made the browser drop that answer and send the form again. After a sign-in or "Confirm it's you" the
  // first answer carries the new session's cookie, so the second arrived with the old one and signed the
  // person out; a contact request was stored twice. The mark goes after a while (a stopped page can be sent
  // again) and when the page comes back from the back/forward cache.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!form.matches || form.matches("[hx-post], [hx-get]") || event.defaultPrevented) return;
    if ((form.getAttribute("method") || "get").toLowerCase() !== "post") return;
    if (form.hasAttribute("data-sent")) {
      event.preventDefault();
      return;
    }
    form.setAttribute("data-sent", "");
    setTimeout(function () { form.removeAttribute("data-sent"); }, 10000);
  });
  window.addEventListener("pageshow", function () {
    var sent = document.querySelectorAll("form[data-sent]");
    for (var i = 0; i < sent.length; i++) sent[i].removeAttribute("data-sent");
  });

  document.addEventListener("click", function (event) {
    var button = event.target.closest && event.target.closest("dialog.wizard [data-close-dialog]");
    if (!button) return;
    event.preventDefault();
    button.closest("dialog").close();
  });

  // "close" does not bubble: listen in the capture phase. Escape also ends here (native cancel -> close).
  document.addEventListener("close", function (event) {
    var dialog = event.target;
    if (!dialog.matches || !dialog.matches("dialog.wizard")) return;
    dialog.remove();
    var back = opener && document.contains(opener) ? opener : document.querySelector("#tfa-row .gear");
    if (back) back.focus();
    opener = null;
  }, true);
})();
