// recsys dashboard: the only script, an enhancement. Every page works without it.
// A select marked data-autosubmit redraws its form's result as soon as another option is chosen.
document.addEventListener("change", (event) => {
  const field = event.target;
  if (field instanceof HTMLSelectElement && field.hasAttribute("data-autosubmit") && field.form) {
    field.form.requestSubmit();
  }
});
