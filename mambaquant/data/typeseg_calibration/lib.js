/**
 * Moto Dashboard JavaScript Library
 * Handles dynamic table generation for Moto AWS service mocking data
 */

// Wait for DOM to be fully loaded before initializing the dashboard
window.addEventListener('DOMContentLoaded', function () {
  refreshData();
});

/**
 * Fetches data from the Moto API and updates the dashboard tables
 * @async
 * @function refreshData
 */
const refreshData = async () => {
  await fetch('/moto-api/data.json')
    .then(result => result.json())
    .then(data => {
      // Update the dashboard with fetched data
      updateTable(data);

      // Clean up CSS classes after initial load - hide non-active tabs
      $('.onbootonly').each(function () {
        this.className = 'tab-pane';
      });
    });
};

/**
 * Expected data structure from /moto-api/data.json:
 * {
 *   // Service name (e.g., "cloudwatch", "core", "events")
 *   "cloudwatch": {
 *     // Resource type name with array of resource instances
 *     "Alarm": [],           // Array of alarm objects
 *     "Dashboard": [],       // Array of dashboard objects
 *     "InsightRule": [],     // Array of insight rule objects
 *     "MetricAggregatedDatum": [],
 *     "MetricDatum": [],
 *     "MetricDatumBase": []
 *   },
 *   "core": {
 *     "CloudFormationModel": []
 *   },
 *   "events": {
 *     "Archive": [],
 *     "Connection": [],
 *     "Destination": [],
 *     "EventBus": [],
 *     "PartnerEventSource": [],
 *     "Replay": [],
 *     "Rule": []
 *   }
 * }
 */

/**
 * Main function to update the dashboard with service data
 * Creates tabbed interface with Bootstrap tables for each service and resource type
 * @param {Object} data - The service data object from Moto API
 * @function updateTable
 */
function updateTable(data) {
  // Get the main data container element from the HTML
  const dataContainer = document.getElementById('data');
  if (!dataContainer) {
    console.error('Element with id="data" not found');
    return;
  }

  // Create navigation menu tabs for each service
  const listService = document.getElementById('list-service');
  if (listService) {
    Object.keys(data).forEach((serviceName, svcIndex) => {
      // Create navigation item for each service
      const listItem = document.createElement('li');
      listItem.className = 'nav-item';

      // Create clickable tab button for service
      const listItemLink = document.createElement('button');
      listItemLink.className = 'nav-link';
      listItemLink.setAttribute('id', `service-tab-${serviceName}`);
      listItemLink.setAttribute('data-bs-toggle', 'pill');
      listItemLink.setAttribute('data-bs-target', `#div-table-${serviceName}`);
      listItemLink.setAttribute('role', 'tab');
      listItemLink.setAttribute('aria-controls', `div-table-${serviceName}`);
      listItemLink.setAttribute('type', 'button');

      // Set first service as active/selected by default
      if (svcIndex == 0) {
        listItemLink.setAttribute('aria-selected', 'true');
        listItemLink.classList.add('active');
        focusedService = serviceName;
      } else {
        listItemLink.setAttribute('aria-selected', 'false');
      }

      // Set service name as button text
      listItemLink.textContent = serviceName;
      listItem.appendChild(listItemLink);
      listService.appendChild(listItem);
    });
  }

  // Clear existing content from previous renders
  dataContainer.innerHTML = '';

  // Handle empty or invalid data
  if (!data || Object.keys(data).length == 0) {
    const noDataMessage = document.createElement('p');
    noDataMessage.textContent = 'No data';
    dataContainer.appendChild(noDataMessage);
    return;
  }

  // Create tab content for each service
  // Structure: Service Tab -> Resource Tables within each tab
  Object.keys(data).forEach((serviceName) => {
    const resources = data[serviceName];

    // Create container div for this service's content
    const serviceDiv = document.createElement('div');
