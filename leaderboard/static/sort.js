// Click a header of a table.sortable to sort its rows by that column (again to reverse). Cells compare by their
// data-sort attribute, else their text; numbers numerically; empty values ("-" cells) always last.
"use strict";

function sortKey(row, column) {
  const cell = row.cells[column];
  const text = cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent.trim();
  const number = Number(text);
  return { empty: text === "" || text === "-", number: text !== "" && Number.isFinite(number) ? number : null, text };
}

function compare(a, b) {
  if (a.number !== null && b.number !== null) return a.number - b.number;
  return a.text.localeCompare(b.text);
}

document.querySelectorAll("table.sortable").forEach((table) => {
  const headers = Array.from(table.tHead.rows[0].cells);
  headers.forEach((header, column) => {
    header.tabIndex = 0;
    const sort = () => {
      const ascending = header.getAttribute("aria-sort") === "descending" ||
        (!header.hasAttribute("aria-sort") && !header.classList.contains("num"));
      headers.forEach((other) => other.removeAttribute("aria-sort"));
      header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      const body = table.tBodies[0];
      const rows = Array.from(body.rows).map((row) => ({ row, key: sortKey(row, column) }));
      rows.sort((a, b) => {
        if (a.key.empty !== b.key.empty) return a.key.empty ? 1 : -1;
        return ascending ? compare(a.key, b.key) : compare(b.key, a.key);
      });
      rows.forEach(({ row }) => body.appendChild(row));
    };
    header.addEventListener("click", sort);
    header.addEventListener("keydown", (event) => { if (event.key === "Enter") sort(); });
  });
});
